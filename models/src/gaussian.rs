//! Fused ops of the diagonal Gaussian posterior, with hand-written backward passes:
//! the reparameterisation `z = μ + exp(½ log σ²)·ε` and the per-dimension KL to N(0, 1),
//! `½(σ² + μ² − 1 − log σ²)`. On CPU each is one pass forward and one backward instead of a
//! handful of small candle ops and their gradients; other devices use the composed form.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::cpu::contiguous_f32;
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
        let (mu, lv, eps) = (
            contiguous_f32(s1, l1, "μ")?,
            contiguous_f32(s2, l2, "log σ²")?,
            contiguous_f32(s3, l3, "ε")?,
        );
        if mu.len() != lv.len() || mu.len() != eps.len() {
            candle_core::bail!("reparameterise: μ, log σ² and ε differ in size");
        }
        let z = mu
            .iter()
            .zip(lv)
            .zip(eps)
            .map(|((m, l), e)| m + (0.5 * l).exp() * e)
            .collect();
        Ok((CpuStorage::F32(z), l1.shape().clone()))
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
        let (g, lv, eps) = (
            contiguous_f32(s1, l1, "gradient")?,
            contiguous_f32(s2, l2, "log σ²")?,
            contiguous_f32(s3, l3, "ε")?,
        );
        let d = g
            .iter()
            .zip(lv)
            .zip(eps)
            .map(|((g, l), e)| 0.5 * (0.5 * l).exp() * e * g)
            .collect();
        Ok((CpuStorage::F32(d), l1.shape().clone()))
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
        let (mu, lv) = (
            contiguous_f32(s1, l1, "μ")?,
            contiguous_f32(s2, l2, "log σ²")?,
        );
        if mu.len() != lv.len() {
            candle_core::bail!("gaussian kl: μ and log σ² differ in size");
        }
        let kl = mu
            .iter()
            .zip(lv)
            .map(|(m, l)| 0.5 * (l.exp() + m * m - 1.0 - l))
            .collect();
        Ok((CpuStorage::F32(kl), l1.shape().clone()))
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
        let (g, lv) = (
            contiguous_f32(s1, l1, "gradient")?,
            contiguous_f32(s2, l2, "log σ²")?,
        );
        let d = g
            .iter()
            .zip(lv)
            .map(|(g, l)| 0.5 * (l.exp() - 1.0) * g)
            .collect();
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `z = μ + exp(½ log σ²)·ε`, all (B, d).
pub fn reparameterise(mu: &Tensor, log_var: &Tensor, eps: &Tensor) -> Result<Tensor> {
    if fused(mu) {
        Ok(mu
            .contiguous()?
            .apply_op3(&log_var.contiguous()?, &eps.contiguous()?, Reparam)?)
    } else {
        Ok((mu + (log_var.affine(0.5, 0.0)?.exp()? * eps)?)?)
    }
}

/// Per-example, per-dimension KL(N(μ, σ²) ‖ N(0, 1)) = ½(σ² + μ² − 1 − log σ²): (B, d).
pub fn gaussian_kl(mu: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    if fused(mu) {
        Ok(mu.contiguous()?.apply_op2(&log_var.contiguous()?, KlDims)?)
    } else {
        Ok((((log_var.exp()? + mu.sqr()?)? - 1.0)? - log_var)?.affine(0.5, 0.0)?)
    }
}
