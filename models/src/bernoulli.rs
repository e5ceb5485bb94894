//! Fused Bernoulli negative log-likelihood on logits, per example:
//! `Σ_d relu(l) − x·l + log(1 + exp(−|l|))` — finite for any logit — with its hand-written
//! backward `∂/∂l = σ(l) − x`. One pass forward and one pass backward instead of a chain of
//! elementwise ops and their gradients (CPU; other devices use the composed form). The CPU
//! kernels are vectorized (polynomial `exp`/`ln`, per-row sums in independent lanes) and split
//! across the thread pool by rows when the batch is large.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu::contiguous_f32;
use crate::error::Result;
use crate::fastmath::{exp, ln};

/// Elements below which a kernel runs on the calling thread (waking the pool costs more).
const PARALLEL_MIN: usize = 1 << 16;

/// Lanes of the per-row sums: independent accumulators the compiler keeps in vector registers.
const LANES: usize = 16;

/// One element's `relu(l) − x·l + ln(1 + e^−|l|)`.
#[inline(always)]
fn bce(l: f32, x: f32) -> f32 {
    l.max(0.0) - x * l + ln(1.0 + exp(-l.abs()))
}

/// One row's Bernoulli NLL, summed in [`LANES`] interleaved partial sums.
#[inline(always)]
fn row_nll(l: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (lc, xc) = (l.chunks_exact(LANES), x.chunks_exact(LANES));
    let (l_rest, x_rest) = (lc.remainder(), xc.remainder());
    for (l, x) in lc.zip(xc) {
        for j in 0..LANES {
            acc[j] += bce(l[j], x[j]);
        }
    }
    let tail: f32 = l_rest.iter().zip(x_rest).map(|(l, x)| bce(*l, *x)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Each row's Bernoulli NLL: `out[r] = Σ bce(logits[r·d..], x[r·d..])`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn nll_rows(logits: &[f32], x: &[f32], d: usize, out: &mut [f32]) {
    for ((o, l), x) in out
        .iter_mut()
        .zip(logits.chunks_exact(d))
        .zip(x.chunks_exact(d))
    {
        *o = row_nll(l, x);
    }
}

/// The gradient for logits, over them: `l[r·d + j] ← g[r]·(σ(l[r·d + j]) − x[r·d + j])`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn grad_rows(l: &mut [f32], x: &[f32], g: &[f32], d: usize) {
    for ((l, x), g) in l.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g) {
        for (l, x) in l.iter_mut().zip(x) {
            *l = g * (1.0 / (1.0 + exp(-*l)) - *x);
        }
    }
}

/// Each row's NLL of targets `x` under `logits`, rows of `d` values.
pub(crate) fn nll(logits: &[f32], x: &[f32], d: usize) -> Vec<f32> {
    let d = d.max(1);
    let mut out = vec![0f32; logits.len() / d];
    over_rows(&mut out, 1, d, |rows, out| {
        let at = rows.start * d..rows.end * d;
        nll_rows(&logits[at.clone()], &x[at], d, out)
    });
    out
}

/// Turns `logits` into their gradient `g[r]·(σ(l) − x)` in place, rows of `d` values.
pub(crate) fn grad_in_place(logits: &mut [f32], x: &[f32], g: &[f32], d: usize) {
    let d = d.max(1);
    over_rows(logits, d, d, |rows, l| {
        let at = rows.start * d..rows.end * d;
        grad_rows(l, &x[at], &g[rows], d)
    });
}

/// Runs `kernel(rows, out)` over the rows of `out` (`width` values a row, `cost` elements of
/// work a row): in parallel blocks of rows when the work is large.
fn over_rows(
    out: &mut [f32],
    width: usize,
    cost: usize,
    kernel: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let rows = out.len() / width.max(1);
    let threads = rayon::current_num_threads();
    if threads > 1 && rows > 1 && rows * cost >= PARALLEL_MIN {
        let block = rows.div_ceil(threads * 4);
        out.par_chunks_mut(block * width)
            .enumerate()
            .for_each(|(i, chunk)| {
                let first = i * block;
                kernel(first..first + chunk.len() / width.max(1), chunk)
            });
    } else {
        kernel(0..rows, out);
    }
}

struct BernoulliNll;

impl CustomOp2 for BernoulliNll {
    fn name(&self) -> &'static str {
        "bernoulli-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, x) = (
            contiguous_f32(s1, l1, "logits")?,
            contiguous_f32(s2, l2, "targets")?,
        );
        let (rows, dim) = l1.shape().dims2()?;
        if l2.shape() != l1.shape() {
            candle_core::bail!(
                "bernoulli nll: logits {:?} and targets {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let out = nll(logits, x, dim);
        debug_assert_eq!(out.len(), rows);
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(x, &grad.contiguous()?, &BernoulliNllGrad)?;
        Ok((Some(g), None))
    }
}

struct BernoulliNllGrad;

impl CustomOp3 for BernoulliNllGrad {
    fn name(&self) -> &'static str {
        "bernoulli-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, x, g) = (
            contiguous_f32(s1, l1, "logits")?,
            contiguous_f32(s2, l2, "targets")?,
            contiguous_f32(s3, l3, "gradient")?,
        );
        let (rows, dim) = l1.shape().dims2()?;
        if l2.shape() != l1.shape() || g.len() != rows {
            candle_core::bail!(
                "bernoulli nll grad: logits {:?}, targets {:?}, gradient {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut out = logits.to_vec();
        grad_in_place(&mut out, x, g, dim);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-example Bernoulli negative log-likelihood of `x` (B, D) under `logits` (B, D), in nats.
pub fn bernoulli_nll(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    if crate::forms::fused(logits) {
        Ok(logits
            .contiguous()?
            .apply_op2(&x.contiguous()?, BernoulliNll)?)
    } else {
        let per = ((logits.relu()? - (x * logits)?)? + logits.abs()?.neg()?.exp()?.log1p()?)?;
        Ok(per.sum(1)?)
    }
}

trait Log1p {
    fn log1p(&self) -> candle_core::Result<Tensor>;
}

impl Log1p for Tensor {
    fn log1p(&self) -> candle_core::Result<Tensor> {
        (self + 1.0)?.log()
    }
}
