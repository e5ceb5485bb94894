//! Fused Bernoulli negative log-likelihood on logits, per example:
//! `Σ_d relu(l) − x·l + log(1 + exp(−|l|))` — finite for any logit — with its hand-written
//! backward `∂/∂l = σ(l) − x`. One pass forward and one pass backward instead of a chain of
//! elementwise ops and their gradients (CPU; other devices use the composed form).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::cpu::contiguous_f32;
use crate::error::Result;

/// `ln(1 + e)` for `e = exp(−|l|) ∈ (0, 1]` is within 1e-7 of `log1p(e)` and several times
/// faster than `log1pf`.
#[inline]
fn bce(l: f32, x: f32) -> f32 {
    l.max(0.0) - x * l + (1.0 + (-l.abs()).exp()).ln()
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
        let out: Vec<f32> = logits
            .chunks_exact(dim.max(1))
            .zip(x.chunks_exact(dim.max(1)))
            .map(|(l, x)| l.iter().zip(x).map(|(l, x)| bce(*l, *x)).sum())
            .collect();
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
        let (_, dim) = l1.shape().dims2()?;
        let mut out = Vec::with_capacity(logits.len());
        for ((l, x), g) in logits
            .chunks_exact(dim.max(1))
            .zip(x.chunks_exact(dim.max(1)))
            .zip(g)
        {
            out.extend(
                l.iter()
                    .zip(x)
                    .map(|(l, x)| g * (1.0 / (1.0 + (-l).exp()) - x)),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-example Bernoulli negative log-likelihood of `x` (B, D) under `logits` (B, D), in nats.
pub fn bernoulli_nll(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
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
