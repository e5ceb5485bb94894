//! Observation models p(x|z): Bernoulli on logits, Gaussian with fixed or learned variance.

use std::f64::consts::PI;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::bernoulli::bernoulli_nll;
use crate::error::{ModelError, Result};
use crate::params::Params;

/// Which likelihood, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LikelihoodKind {
    /// Bernoulli on logits (binary or [0, 1] data).
    Bernoulli,
    /// Gaussian with a fixed variance.
    GaussianFixed,
    /// Gaussian with one learned variance.
    GaussianGlobal,
    /// Gaussian with a learned variance per data dimension.
    GaussianPerDim,
}

/// A likelihood with its parameters (the learned log-variance, if any).
#[derive(Debug, Clone)]
pub struct Likelihood {
    kind: LikelihoodKind,
    log_var: Option<Tensor>,
    fixed_log_var: f64,
}

impl Likelihood {
    /// Builds the likelihood for `dim`-dimensional data; `variance` is used by `GaussianFixed`.
    pub fn new(
        params: &mut Params,
        kind: LikelihoodKind,
        dim: usize,
        variance: f64,
    ) -> Result<Self> {
        if !(variance.is_finite() && variance > 0.0) {
            return Err(ModelError::Spec(format!(
                "Gaussian variance {variance} must be finite and positive"
            )));
        }
        let log_var = match kind {
            LikelihoodKind::GaussianGlobal => {
                Some(params.constant("likelihood.log_var", &[1], 0.0)?)
            }
            LikelihoodKind::GaussianPerDim => {
                Some(params.constant("likelihood.log_var", &[dim], 0.0)?)
            }
            _ => None,
        };
        Ok(Likelihood {
            kind,
            log_var,
            fixed_log_var: variance.ln(),
        })
    }

    /// The kind.
    pub fn kind(&self) -> LikelihoodKind {
        self.kind
    }

    /// Per-example −log p(x|out) in nats: `out` and `x` are (B, D).
    pub fn nll(&self, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            LikelihoodKind::Bernoulli => bernoulli_nll(out, x),
            _ => {
                let dim = x.dim(D::Minus1)? as f64;
                let sq = (x - out)?.sqr()?;
                let half_log_2pi = 0.5 * (2.0 * PI).ln();
                match &self.log_var {
                    None => {
                        let scaled = (sq.sum(D::Minus1)? * (0.5 * (-self.fixed_log_var).exp()))?;
                        Ok((scaled + dim * (0.5 * self.fixed_log_var + half_log_2pi))?)
                    }
                    Some(lv) => {
                        let lv = lv.broadcast_as(sq.shape())?;
                        let per = ((sq * lv.neg()?.exp()?)? + &lv)?;
                        Ok(((per.sum(D::Minus1)? * 0.5)? + dim * half_log_2pi)?)
                    }
                }
            }
        }
    }

    /// The mean of p(x|out): σ(out) for Bernoulli, `out` for Gaussians.
    pub fn mean(&self, out: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            LikelihoodKind::Bernoulli => candle_nn::ops::sigmoid(out)?,
            _ => out.clone(),
        })
    }
}
