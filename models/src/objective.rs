//! The training objective of the Gaussian-latent models: reconstruction + β·KL (the analytic
//! KL of the diagonal Gaussian posterior to its prior) with linear KL warm-up and free bits,
//! written as sums over this rank's rows so that N ranks add up to one global batch.
//!
//! Free bits (Kingma et al. 2016) clamp each latent dimension's *batch-mean* KL from below:
//! `Σ_d max(KL̄_d, λ)`. The clamp is not linear, so applying it to each rank's share of a batch
//! would make the gradient depend on how the batch is split. Here the batch means come from the
//! global batch's per-dimension KL sums ([`free_bits_statistics`], all-reduced by the trainer
//! before the loss): a dimension whose global batch-mean KL is above λ is penalised through its
//! rows' KL, the others contribute the constant λ, and N workers compute what one process does.

use std::collections::BTreeMap;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
pub use crate::gaussian::gaussian_kl;
use crate::model::{LossOutput, StepContext, Term};

/// Knobs of the objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Weight of the KL term (1 = the ELBO, > 1 = β-VAE).
    pub beta: f64,
    /// Steps over which the KL weight rises linearly from 0 to β (0 = no warm-up).
    pub warmup_steps: u64,
    /// Free bits: per latent dimension, a global-batch-mean KL below this many nats is not
    /// penalised (0 = off).
    pub free_bits: f64,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            beta: 1.0,
            warmup_steps: 0,
            free_bits: 0.0,
        }
    }
}

/// The terms [`vae_loss`] reports, sorted.
pub const VAE_TERMS: [&str; 5] = ["kl", "kl_weight", "loss", "neg_elbo", "rec"];

impl Objective {
    /// Checks the knobs.
    pub fn validate(&self) -> Result<()> {
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_non_negative(self.beta) || !finite_non_negative(self.free_bits) {
            return Err(ModelError::Spec(format!(
                "beta ({}) and free bits ({}) must be finite and ≥ 0",
                self.beta, self.free_bits
            )));
        }
        Ok(())
    }

    /// The KL weight at a (0-based) step.
    pub fn kl_weight(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            self.beta
        } else {
            self.beta * ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        }
    }

    /// The rounds of batch statistics the objective needs for `latent_dim` dimensions: one of
    /// the per-dimension KL sums with free bits, none without.
    pub fn batch_rounds(&self, latent_dim: usize) -> Vec<usize> {
        if self.free_bits > 0.0 {
            vec![latent_dim]
        } else {
            Vec::new()
        }
    }
}

/// The batch statistics of free bits: per-dimension KL summed over this rank's rows, (d,).
pub fn free_bits_statistics(kl_dims: &Tensor) -> Result<Tensor> {
    Ok(kl_dims.sum(0)?.detach())
}

/// The standard objective of this rank's rows, from the per-example reconstruction NLL (B,)
/// and the per-dimension KL (B, d); `ctx.batch_stats` holds the global per-dimension KL sums
/// when free bits are on.
pub fn vae_loss(
    rec: &Tensor,
    kl_dims: &Tensor,
    objective: &Objective,
    ctx: &StepContext<'_>,
) -> Result<LossOutput> {
    let (rows, d) = kl_dims.dims2()?;
    let device = rec.device();
    let kl = kl_dims.sum(D::Minus1)?;
    let penalised = if objective.free_bits > 0.0 {
        if ctx.batch_stats.len() != d {
            return Err(ModelError::Input(format!(
                "free bits need the global KL sums of {d} latent dimensions, got {}",
                ctx.batch_stats.len()
            )));
        }
        let n = ctx.global_rows.max(1) as f64;
        let lambda = objective.free_bits;
        let active: Vec<f32> = ctx
            .batch_stats
            .iter()
            .map(|s| f32::from(f64::from(*s) / n > lambda))
            .collect();
        let floor = active.iter().filter(|a| **a == 0.0).count() as f64 * lambda;
        let mask = Tensor::from_vec(active, (1, d), device)?;
        (kl_dims.broadcast_mul(&mask)?.sum(D::Minus1)? + floor)?
    } else {
        kl.clone()
    };
    let weight = objective.kl_weight(ctx.step);
    let objective_rows = (rec + (penalised * weight)?)?;
    let loss = (objective_rows.sum_all()? / ctx.global_rows.max(1) as f64)?;
    let terms = BTreeMap::from([
        ("rec", Term::per_row(rec)?),
        ("kl", Term::per_row(&kl)?),
        ("neg_elbo", Term::per_row(&(rec + &kl)?)?),
        ("loss", Term::per_row(&objective_rows)?),
        ("kl_weight", Term::constant(weight, rows, device)?),
    ]);
    Ok(LossOutput {
        loss,
        terms,
        update_stats: None,
    })
}
