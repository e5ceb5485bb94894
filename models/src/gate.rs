//! The gated activation of PixelCNN and WaveNet, `tanh(a)·σ(b)` of the two halves of the
//! channels, fused: on CPU one pass forward and one backward (recomputing tanh and σ from the
//! input) instead of two narrows, three elementwise ops and their gradients; other devices use
//! the composed form.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu::contiguous_f32;
use crate::error::Result;
use crate::fastmath::exp;

/// `(tanh a, σ b)`.
#[inline(always)]
fn halves(a: f32, b: f32) -> (f32, f32) {
    (1.0 - 2.0 / (exp(2.0 * a) + 1.0), 1.0 / (1.0 + exp(-b)))
}

/// `y = tanh(a)·σ(b)`, elementwise.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn forward(y: &mut [f32], a: &[f32], b: &[f32]) {
    for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
        let (t, s) = halves(*a, *b);
        *y = t * s;
    }
}

/// The gradients `da`, `db` of `tanh(a)·σ(b)` given its output's gradient `g`, elementwise.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn backward(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    for ((((da, db), a), b), g) in da.iter_mut().zip(db).zip(a).zip(b).zip(g) {
        let (t, s) = halves(*a, *b);
        *da = g * s * (1.0 - t * t);
        *db = g * t * s * (1.0 - s);
    }
}

/// For an input (B, 2C, …): B, and the values in each half of one example (C·…); an error for
/// fewer than two dimensions or an odd channel count.
fn blocks(shape: &Shape) -> candle_core::Result<(usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 || dims[1] % 2 != 0 {
        candle_core::bail!("gate: expected (B, 2C, …) with an even channel count, got {dims:?}");
    }
    let half: usize = dims[1] / 2 * dims[2..].iter().product::<usize>();
    Ok((dims[0], half))
}

struct Gate;

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "gate input")?;
        let (batch, half) = blocks(l.shape())?;
        let mut y = vec![0.0f32; batch * half];
        y.par_chunks_mut(half)
            .zip(x.par_chunks(2 * half))
            .for_each(|(y, x)| {
                let (a, b) = x.split_at(half);
                forward(y, a, b);
            });
        let mut dims = l.shape().dims().to_vec();
        dims[1] /= 2;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GateGrad)?))
    }
}

/// The input's gradient: `g·σ(b)·(1 − tanh² a)` and `g·tanh a·σ(b)(1 − σ(b))`.
struct GateGrad;

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "gate-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (
            contiguous_f32(sx, lx, "gate input")?,
            contiguous_f32(sg, lg, "gate gradient")?,
        );
        let (batch, half) = blocks(lx.shape())?;
        if g.len() != batch * half {
            candle_core::bail!(
                "gate: a gradient of {} values for {:?}",
                g.len(),
                lx.shape()
            );
        }
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(2 * half)
            .zip(x.par_chunks(2 * half))
            .zip(g.par_chunks(half))
            .for_each(|((dx, x), g)| {
                let (da, db) = dx.split_at_mut(half);
                let (a, b) = x.split_at(half);
                backward(da, db, a, b, g);
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}

/// `tanh(a)·σ(b)` where `a` and `b` are the first and second halves of dimension 1 of `x`
/// (B, 2C, …): (B, C, …).
pub fn gated_tanh(x: &Tensor) -> Result<Tensor> {
    blocks(x.shape())?;
    if crate::forms::fused(x) {
        return Ok(x.contiguous()?.apply_op1(Gate)?);
    }
    let c = x.dim(1)? / 2;
    Ok((x.narrow(1, 0, c)?.tanh()? * candle_nn::ops::sigmoid(&x.narrow(1, c, c)?)?)?)
}
