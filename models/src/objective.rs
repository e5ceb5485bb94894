//! The training objective: reconstruction + β·KL (the analytic KL of the diagonal Gaussian
//! posterior to N(0, 1)) with linear KL warm-up and free bits.

use std::collections::BTreeMap;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
pub use crate::gaussian::gaussian_kl;

/// Knobs of the objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Weight of the KL term (1 = the ELBO, > 1 = β-VAE).
    pub beta: f64,
    /// Steps over which the KL weight rises linearly from 0 to β (0 = no warm-up).
    pub warmup_steps: u64,
    /// Free bits: per latent dimension, the batch-mean KL below this many nats is not
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
}

/// The result of a loss evaluation: a differentiable scalar and the terms, each reported.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar to minimise.
    pub loss: Tensor,
    /// Reported terms (batch means, nats per example): `rec`, `kl`, `neg_elbo`, `loss`,
    /// `kl_weight` and whatever a model adds.
    pub terms: BTreeMap<&'static str, Tensor>,
}

/// The standard VAE objective from per-example reconstruction NLL (B,) and per-dimension KL (B, d).
pub fn vae_loss(
    rec: &Tensor,
    kl_dims: &Tensor,
    objective: &Objective,
    step: u64,
) -> Result<LossOutput> {
    let rec_mean = rec.mean(0)?;
    let kl_mean = kl_dims.sum(D::Minus1)?.mean(0)?;
    let kl_penalised = if objective.free_bits > 0.0 {
        kl_dims.mean(0)?.maximum(objective.free_bits)?.sum(0)?
    } else {
        kl_mean.clone()
    };
    let weight = objective.kl_weight(step);
    let loss = (&rec_mean + (kl_penalised * weight)?)?;
    let neg_elbo = (&rec_mean + &kl_mean)?;
    let terms = BTreeMap::from([
        ("rec", rec_mean),
        ("kl", kl_mean),
        ("neg_elbo", neg_elbo),
        ("loss", loss.clone()),
        ("kl_weight", Tensor::new(weight as f32, loss.device())?),
    ]);
    Ok(LossOutput { loss, terms })
}
