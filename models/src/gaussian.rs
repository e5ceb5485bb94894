//! Fused ops of the diagonal Gaussian posterior, with hand-written backward passes:
//! the reparameterisation `z = μ + exp(½ log σ²)·ε` and the per-dimension KL to N(0, 1),
//! `½(σ² + μ² − 1 − log σ²)`. On CPU each is one pass forward and one backward instead of a
//! handful of small candle ops and their gradients; other devices use the composed form.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::cpu::{map2, map3};
use crate::error::Result;

struct Reparam;

impl CustomOp3 for Reparam {
    fn name(&self) -> &'static str {
        "reparameterise"
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
        map3(self.name(), (s1, l1), (s2, l2), (s3, l3), |m, l, e| {
            m + (0.5 * l).exp() * e
        })
    }

    fn bwd(
        &self,
        _mu: &Tensor,
        lv: &Tensor,
        eps: &Tensor,
        _z: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dlv = g
            .contiguous()?
            .apply_op3_no_bwd(lv, eps, &ReparamLogVarGrad)?;
        Ok((Some(g.clone()), Some(dlv), None))
    }
}

/// ∂z/∂log σ² · g = ½·exp(½ log σ²)·ε·g.
struct ReparamLogVarGrad;

impl CustomOp3 for ReparamLogVarGrad {
    fn name(&self) -> &'static str {
        "reparameterise-grad"
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
        map3(self.name(), (s1, l1), (s2, l2), (s3, l3), |g, l, e| {
            0.5 * (0.5 * l).exp() * e * g
        })
    }
}

struct KlDims;

impl CustomOp2 for KlDims {
    fn name(&self) -> &'static str {
        "gaussian-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2(self.name(), (s1, l1), (s2, l2), |m, l| {
            0.5 * (l.exp() + m * m - 1.0 - l)
        })
    }

    fn bwd(
        &self,
        mu: &Tensor,
        lv: &Tensor,
        _kl: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dmu = (&g * mu)?;
        let dlv = g.apply_op2_no_bwd(lv, &KlLogVarGrad)?;
        Ok((Some(dmu), Some(dlv)))
    }
}

/// ∂KL/∂log σ² · g = ½(exp(log σ²) − 1)·g.
struct KlLogVarGrad;

impl CustomOp2 for KlLogVarGrad {
    fn name(&self) -> &'static str {
        "gaussian-kl-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2(self.name(), (s1, l1), (s2, l2), |g, l| {
            0.5 * (l.exp() - 1.0) * g
        })
    }
}

/// `z = μ + exp(½ log σ²)·ε`, all (B, d).
pub fn reparameterise(mu: &Tensor, log_var: &Tensor, eps: &Tensor) -> Result<Tensor> {
    if crate::forms::fused(mu) {
        Ok(mu
            .contiguous()?
            .apply_op3(&log_var.contiguous()?, &eps.contiguous()?, Reparam)?)
    } else {
        Ok((mu + (log_var.affine(0.5, 0.0)?.exp()? * eps)?)?)
    }
}

/// Per-example, per-dimension KL(N(μ, σ²) ‖ N(0, 1)) = ½(σ² + μ² − 1 − log σ²): (B, d).
pub fn gaussian_kl(mu: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    if crate::forms::fused(mu) {
        Ok(mu.contiguous()?.apply_op2(&log_var.contiguous()?, KlDims)?)
    } else {
        Ok((((log_var.exp()? + mu.sqr()?)? - 1.0)? - log_var)?.affine(0.5, 0.0)?)
    }
}
