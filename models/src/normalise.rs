//! Batch norm's affine normalisation of a training pass and the activation after it,
//! `y = act((x − μ)·s·γ + β)` with the step's moments `μ` and `s = 1/σ` held fixed. With ReLU
//! it is fused on CPU: one pass forward and one backward (`m = g·[y > 0]`, `∂x = m·γ·s`,
//! `∂γ = Σ_rows m·(x − μ)·s`, `∂β = Σ_rows m`) instead of four broadcast ops, the activation,
//! their gradients and the column sums candle takes for the broadcasts; other activations fuse
//! the affine part, and other devices use the composed form. The moments' own part of the
//! gradient is the correction of [`crate::Norms`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use multiversion::multiversion;

use crate::cpu::{contiguous_f32, cpu_flat};
use crate::error::Result;
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
    if x.device().is_cpu() && x.dtype() == DType::F32 {
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The fused form's value and gradients (input, γ, β) equal the composed form's, which
    /// runs through candle's ops and their gradients, with each activation after it.
    #[test]
    fn the_fused_form_equals_the_composed_one() {
        let (rows, w) = (5, 3);
        let series = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.71 + k).sin() * 1.3).collect()
        };
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
}
