//! Batch norm's affine normalisation of a training pass and the activation after it,
//! `y = act((x − μ)·s·γ + β)` with the step's moments `μ` and `s = 1/σ` held fixed. With ReLU
//! it is fused on CPU: one pass forward and one backward (`m = g·[y > 0]`, `∂x = m·γ·s`,
//! `∂γ = Σ_rows m·(x − μ)·s`, `∂β = Σ_rows m`) instead of four broadcast ops, the activation,
//! their gradients and the column sums candle takes for the broadcasts; other activations fuse
//! the affine part, and other devices use the composed form. The moments' own part of the
//! gradient is the correction of [`crate::Norms`].

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use multiversion::multiversion;

use crate::cpu::{contiguous_f32, cpu_flat, lane_sum_zip};
use crate::error::{ModelError, Result};
use crate::layers::Activation;

/// The moments of one layer: `μ` and `s = 1/σ`, one per feature; ReLU after them or not.
struct Normalise {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    relu: bool,
}

impl Normalise {
    /// The width of an input of shape `shape` (B, width), checked against the moments'.
    fn width(&self, shape: &Shape) -> candle_core::Result<usize> {
        match shape.dims() {
            [_, w] if *w == self.mean.len() => Ok(*w),
            dims => candle_core::bail!(
                "batch norm: an input of shape {dims:?}, expected (batch, {})",
                self.mean.len()
            ),
        }
    }
}

impl CustomOp3 for Normalise {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.width(lx.shape())?;
        let x = contiguous_f32(sx, lx, "batch-norm input")?;
        let gamma = contiguous_f32(sg, lg, "batch-norm γ")?;
        let beta = contiguous_f32(sb, lb, "batch-norm β")?;
        if gamma.len() != w || beta.len() != w {
            candle_core::bail!(
                "batch norm: γ and β of {} and {} values, expected {w}",
                gamma.len(),
                beta.len()
            );
        }
        // Per feature: y = x·a + c with a = s·γ, c = β − μ·a.
        let a: Vec<f32> = self.inv_std.iter().zip(gamma).map(|(s, g)| s * g).collect();
        let c: Vec<f32> = (0..w).map(|j| beta[j] - self.mean[j] * a[j]).collect();
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks_exact(w) {
            y.extend(row.iter().zip(&a).zip(&c).map(|((x, a), c)| x * a + c));
        }
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let w = self.width(x.shape())?;
        let g = g.contiguous()?;
        let (xv, yv, gv) = (cpu_flat(x)?, cpu_flat(y)?, cpu_flat(&g)?);
        let (xs, ys, gs) = (xv.values()?, yv.values()?, gv.values()?);
        let gamma_v = gamma.to_vec1::<f32>()?;
        let a: Vec<f32> = self
            .inv_std
            .iter()
            .zip(&gamma_v)
            .map(|(s, g)| s * g)
            .collect();
        let mut dx = vec![0f32; xs.len()];
        let (mut dgamma, mut dbeta) = (vec![0f32; w], vec![0f32; w]);
        backward_rows(
            (xs, ys, gs),
            (&a, &self.mean, &self.inv_std),
            self.relu,
            (&mut dx, &mut dgamma, &mut dbeta),
        );
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dgamma, w, device)?),
            Some(Tensor::from_vec(dbeta, w, device)?),
        ))
    }
}

/// The backward pass over rows of `a.len()` features: with `m = g·[y > 0]` (ReLU) or `g`,
/// `dx = m·a`, and `Σ_rows m·(x − μ)·s`, `Σ_rows m` added to `dgamma`, `dbeta`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn backward_rows(
    (x, y, g): (&[f32], &[f32], &[f32]),
    (a, mean, inv_std): (&[f32], &[f32], &[f32]),
    relu: bool,
    (dx, dgamma, dbeta): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let w = a.len();
    if w == 0 {
        return;
    }
    let rows = dx
        .chunks_exact_mut(w)
        .zip(x.chunks_exact(w))
        .zip(y.chunks_exact(w).zip(g.chunks_exact(w)));
    for ((dx, x), (y, g)) in rows {
        let values = dx.iter_mut().zip(x).zip(y.iter().zip(g));
        let features = a.iter().zip(mean.iter().zip(inv_std));
        let sums = dgamma.iter_mut().zip(dbeta.iter_mut());
        for (((dx, x), (y, g)), ((a, (mean, inv_std)), (dgamma, dbeta))) in
            values.zip(features.zip(sums))
        {
            let keep = if relu && *y <= 0.0 { 0.0 } else { 1.0 };
            let g = g * keep;
            *dx = g * a;
            *dgamma += g * (x - mean) * inv_std;
            *dbeta += g;
        }
    }
}

/// `act((x − μ)·s·γ + β)` of `x` (B, width) with `mean` and `inv_std` as (1, width) rows
/// (their values in `values`, for the fused form) and `gamma`, `beta` of (width,).
pub(crate) fn normalise(
    x: &Tensor,
    (mean, inv_std): (&Tensor, &Tensor),
    values: (&[f32], &[f32]),
    (gamma, beta): (&Tensor, &Tensor),
    activation: Activation,
) -> Result<Tensor> {
    if crate::forms::fused(x) {
        let relu = activation == Activation::Relu;
        let op = Normalise {
            mean: values.0.to_vec(),
            inv_std: values.1.to_vec(),
            relu,
        };
        let y = x
            .contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
        return if relu { Ok(y) } else { activation.apply(&y) };
    }
    activation.apply(
        &x.broadcast_sub(mean)?
            .broadcast_mul(inv_std)?
            .broadcast_mul(&gamma.unsqueeze(0)?)?
            .broadcast_add(&beta.unsqueeze(0)?)?,
    )
}

/// A backward pass's root whose gradient with respect to `h` is `g` (of h's shape): `Σ h·g` in
/// value. A segment of batch norm's backward pass starts at a layer's input with the gradient
/// the layers above left there; composed, the root is the product and its sum, whose backward
/// pass takes two products, two sums of gradients and a broadcast of the layer's size.
struct Seed {
    g: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "batch-norm-seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l.shape() != self.g.shape() {
            candle_core::bail!(
                "batch-norm seed: h {:?} and its gradient {:?} differ in shape",
                l.shape(),
                self.g.shape()
            );
        }
        let h = contiguous_f32(s, l, "batch-norm seed")?;
        let g = cpu_flat(&self.g)?;
        let dot = lane_sum_zip(h, g.values()?, |h, g| h * g);
        Ok((CpuStorage::F32(vec![dot]), Shape::from(())))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _value: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match grad.to_scalar::<f32>()? {
            1.0 => Ok(Some(self.g.clone())),
            scale => Ok(Some(self.g.affine(f64::from(scale), 0.0)?)),
        }
    }
}

/// `Σ h·g`, whose gradient with respect to `h` is `g` (a root for [`Tensor::backward`]).
pub(crate) fn seeded(h: &Tensor, g: &Tensor) -> Result<Tensor> {
    if crate::forms::fused(h) && g.dtype() == DType::F32 {
        let g = g.contiguous()?;
        return Ok(h.contiguous()?.apply_op1(Seed { g })?);
    }
    Ok((h * g)?.sum_all()?)
}

/// Batch norm's gradient at a layer's input `x` (B, width), completed with the moments' part:
/// `at_input + c` with `c_r = −γ·s·(Σg/N + x̂_r·Σ(g·x̂)/N)` and `x̂_r = (x_r − μ)·s`, given
/// `μ`, `s = 1/σ` (`moments`) and `Σg/N`, `Σ(g·x̂)/N` (`means`) per feature. Per feature it is
/// `c_r = −γ·(u + v·x_r)` with `u = s·(Σg/N − s·μ·Σ(g·x̂)/N)` and `v = s²·Σ(g·x̂)/N`: one pass
/// over the rows on CPU, three broadcast ops elsewhere (γ stays on the device).
pub(crate) fn completed(
    x: &Tensor,
    at_input: Option<&Tensor>,
    gamma: &Tensor,
    moments: (&[f32], &[f32]),
    means: (&[f32], &[f32]),
) -> Result<Tensor> {
    let (u, v) = correction_terms(moments, means);
    if crate::forms::fused(x) {
        let x = x.contiguous()?;
        let at_input = at_input.map(Tensor::contiguous).transpose()?;
        let gamma = gamma.to_vec1::<f32>()?;
        let xv = cpu_flat(&x)?;
        let xs = xv.values()?;
        let mut out = match &at_input {
            Some(t) => cpu_flat(t)?.values()?.to_vec(),
            None => vec![0.0; xs.len()],
        };
        let width = x.dims().last().copied().unwrap_or(0);
        if out.len() != xs.len() || gamma.len() != u.len() || width != u.len() {
            return Err(ModelError::Spec(format!(
                "batch norm's gradient at an input of shape {:?}: {} values above it, γ of {}, \
                 moments of {}",
                x.dims(),
                out.len(),
                gamma.len(),
                u.len()
            )));
        }
        complete_rows(&mut out, xs, (&gamma, &u, &v));
        return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
    }
    composed_completion(x, at_input, gamma, (&u, &v))
}

/// `u` and `v` of [`completed`], per feature.
fn correction_terms(
    (mean, inv_std): (&[f32], &[f32]),
    (mean_g, mean_gx): (&[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    mean.iter()
        .zip(inv_std)
        .zip(mean_g.iter().zip(mean_gx))
        .map(|((m, s), (g, gx))| (s * (g - s * m * gx), s * s * gx))
        .unzip()
}

/// `out_r −= γ·(u + v·x_r)` over rows of `u.len()` features.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn complete_rows(out: &mut [f32], x: &[f32], (gamma, u, v): (&[f32], &[f32], &[f32])) {
    let w = u.len();
    if w == 0 {
        return;
    }
    for (out, x) in out.chunks_exact_mut(w).zip(x.chunks_exact(w)) {
        let features = gamma.iter().zip(u.iter().zip(v));
        for ((out, x), (gamma, (u, v))) in out.iter_mut().zip(x).zip(features) {
            *out -= gamma * (u + v * x);
        }
    }
}

/// [`completed`] in candle's ops, for devices other than the CPU.
fn composed_completion(
    x: &Tensor,
    at_input: Option<&Tensor>,
    gamma: &Tensor,
    (u, v): (&[f32], &[f32]),
) -> Result<Tensor> {
    let w = u.len();
    let device = x.device();
    let gamma = gamma.detach().unsqueeze(0)?;
    let a = Tensor::from_slice(u, (1, w), device)?.mul(&gamma)?.neg()?;
    let b = Tensor::from_slice(v, (1, w), device)?.mul(&gamma)?.neg()?;
    let c = x.broadcast_mul(&b)?.broadcast_add(&a)?;
    Ok(match at_input {
        Some(t) => (t + c)?,
        None => c,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `n` test values, a sine from phase `k`.
    fn series(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.71 + k).sin() * 1.3).collect()
    }

    /// The fused form's value and gradients (input, γ, β) equal the composed form's, which
    /// runs through candle's ops and their gradients, with each activation after it.
    #[test]
    fn the_fused_form_equals_the_composed_one() {
        let (rows, w) = (5, 3);
        let cpu = Device::Cpu;
        let x = Var::from_vec(series(rows * w, 0.2), (rows, w), &cpu).unwrap();
        let gamma = Var::from_vec(series(w, 1.1), w, &cpu).unwrap();
        let beta = Var::from_vec(series(w, 2.3), w, &cpu).unwrap();
        let (mean_v, inv_std_v) = (series(w, 3.7), vec![0.8, 1.7, 0.4]);
        let mean = Tensor::from_slice(&mean_v, (1, w), &cpu).unwrap();
        let inv_std = Tensor::from_slice(&inv_std_v, (1, w), &cpu).unwrap();
        let weights = Tensor::from_vec(series(rows * w, 5.1), (rows, w), &cpu).unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (a, b) in a.iter().zip(b) {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
            }
        };
        for activation in [Activation::Relu, Activation::Tanh, Activation::Gelu] {
            let fused = normalise(
                &x,
                (&mean, &inv_std),
                (&mean_v, &inv_std_v),
                (&gamma, &beta),
                activation,
            )
            .unwrap();
            let composed = activation
                .apply(
                    &x.broadcast_sub(&mean)
                        .unwrap()
                        .broadcast_mul(&inv_std)
                        .unwrap()
                        .broadcast_mul(&gamma.unsqueeze(0).unwrap())
                        .unwrap()
                        .broadcast_add(&beta.unsqueeze(0).unwrap())
                        .unwrap(),
                )
                .unwrap();
            if activation == Activation::Relu {
                let zeros = values(&fused).iter().filter(|v| **v == 0.0).count();
                assert!(
                    zeros > 2 && zeros < rows * w - 2,
                    "{zeros} zeros: ReLU cuts some"
                );
            }
            close(&values(&fused), &values(&composed), "value");
            let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let (gf, gc) = (
                loss(&fused).backward().unwrap(),
                loss(&composed).backward().unwrap(),
            );
            for (name, v) in [("input", &x), ("γ", &gamma), ("β", &beta)] {
                close(
                    &values(gf.get(v.as_tensor()).unwrap()),
                    &values(gc.get(v.as_tensor()).unwrap()),
                    &format!("{activation:?} {name}"),
                );
            }
        }
    }

    /// The completed gradient at a layer's input equals batch norm's correction written out,
    /// `g_r − γ·s·(Σg/N + x̂_r·Σ(g·x̂)/N)` in f64, with and without a gradient from above, on
    /// CPU (one pass) and in the composed form other devices take.
    #[test]
    fn the_completed_gradient_is_batch_norms_correction() {
        let (rows, w) = (6, 4);
        let cpu = Device::Cpu;
        let xs = series(rows * w, 0.4);
        let above = series(rows * w, 2.9);
        let gammas = series(w, 1.3);
        let (mean, inv_std) = (series(w, 4.1), vec![0.9, 2.2, 0.35, 1.1]);
        let (mean_g, mean_gx) = (series(w, 0.7), series(w, 5.3));
        let x = Tensor::from_slice(&xs, (rows, w), &cpu).unwrap();
        let at = Tensor::from_slice(&above, (rows, w), &cpu).unwrap();
        let gamma = Tensor::from_slice(&gammas, w, &cpu).unwrap();
        let moments = (&mean[..], &inv_std[..]);
        let means = (&mean_g[..], &mean_gx[..]);
        for with_above in [false, true] {
            let expected: Vec<f64> = (0..rows * w)
                .map(|i| {
                    let j = i % w;
                    let s = f64::from(inv_std[j]);
                    let x_hat = (f64::from(xs[i]) - f64::from(mean[j])) * s;
                    let c = -f64::from(gammas[j])
                        * s
                        * (f64::from(mean_g[j]) + x_hat * f64::from(mean_gx[j]));
                    c + if with_above { f64::from(above[i]) } else { 0.0 }
                })
                .collect();
            let above = with_above.then_some(&at);
            let fused = completed(&x, above, &gamma, moments, means).unwrap();
            let terms = correction_terms(moments, means);
            let composed = composed_completion(&x, above, &gamma, (&terms.0, &terms.1)).unwrap();
            for (form, got) in [("fused", &fused), ("composed", &composed)] {
                assert_eq!(got.dims(), &[rows, w], "{form}");
                for (i, (g, e)) in values(got).iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(*g) - e).abs() < 1e-5 * (1.0 + e.abs()),
                        "{form}, above {with_above}, value {i}: {g} vs {e}"
                    );
                }
            }
        }
        let narrow = Tensor::from_slice(&gammas[..3], 3, &cpu).unwrap();
        let err = completed(&x, Some(&at), &narrow, moments, means).unwrap_err();
        assert!(err.to_string().contains("γ of 3"), "{err}");
        let short = |v: &[f32]| v[..3].to_vec();
        let (m3, s3, g3, gx3) = (
            short(&mean),
            short(&inv_std),
            short(&mean_g),
            short(&mean_gx),
        );
        let err = completed(&x, None, &narrow, (&m3, &s3), (&g3, &gx3)).unwrap_err();
        assert!(err.to_string().contains("moments of 3"), "{err}");
    }

    /// A seeded root is `Σ h·g` in value and hands `g` (times the root's own gradient) to `h`.
    #[test]
    fn a_seeded_root_hands_its_gradient_to_the_input() {
        let cpu = Device::Cpu;
        let h = Var::from_vec(vec![1.0f32, -2.0, 0.5, 3.0, 0.25, -1.5], (2, 3), &cpu).unwrap();
        let gs = vec![0.5f32, 1.5, -2.0, 4.0, -0.75, 2.0];
        let g = Tensor::from_slice(&gs, (2, 3), &cpu).unwrap();
        let root = seeded(&h, &g).unwrap();
        let dot: f32 = values(h.as_tensor())
            .iter()
            .zip(&gs)
            .map(|(a, b)| a * b)
            .sum();
        assert!((root.to_scalar::<f32>().unwrap() - dot).abs() < 1e-6);
        let grads = root.backward().unwrap();
        assert_eq!(values(grads.get(h.as_tensor()).unwrap()), gs);
        let grads = (root * 3.0).unwrap().backward().unwrap();
        let tripled: Vec<f32> = gs.iter().map(|g| g * 3.0).collect();
        assert_eq!(values(grads.get(h.as_tensor()).unwrap()), tripled);
        let wrong = Tensor::zeros((3, 2), DType::F32, &cpu).unwrap();
        assert!(
            seeded(&h, &wrong).is_err(),
            "shapes that differ are refused"
        );
    }
}
