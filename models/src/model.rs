//! The interface every model of the family implements.
//!
//! How the variants fit (checked on paper):
//! - conditional VAE: `Input::labels` go into encoder and decoder; `decode_mean` takes labels.
//! - semi-supervised M2: one batch mixes labeled and unlabeled rows (`labels[i] = None`); its
//!   `loss` adds the classifier term and enumerates y for unlabeled rows; `log_weights`
//!   enumerates y inside the importance weights.
//! - VQ-VAE: `loss` adds codebook/commitment terms; the EMA codebook is non-gradient state
//!   returned by `buffers` (averaged across workers, checkpointed, never in the optimiser).
//! - hierarchical VAEs: several latent layers inside `loss`/`log_weights`; `latent_dim` is the
//!   top layer's, which `decode_mean` samples from.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::Result;
use crate::noise::Noise;
use crate::objective::{LossOutput, Objective};
use crate::params::Params;

/// One minibatch as a model sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Examples, (B, D) with D the flattened example size.
    pub x: &'a Tensor,
    /// Labels (`None` = unlabeled).
    pub labels: &'a [Option<i64>],
    /// Stable row ids: the noise of an example is drawn from a stream keyed by its id.
    pub ids: &'a [u64],
}

/// A latent-variable model trained by a variational bound.
pub trait Model: Send {
    /// The trainable parameters, by name.
    fn params(&self) -> &Params;

    /// Non-gradient state that workers average and checkpoints keep (none by default).
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Dimension of the latent space `decode_mean` takes.
    fn latent_dim(&self) -> usize;

    /// The training loss of a minibatch at a global step (the step keys the noise).
    fn loss(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        step: u64,
        objective: &Objective,
    ) -> Result<LossOutput>;

    /// Importance log-weights `log p(x, z_s) − log q(z_s | x)` for samples `samples`: (S, B).
    fn log_weights(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        samples: Range<usize>,
    ) -> Result<Tensor>;

    /// The mean of q(z|x): (B, latent_dim) (for reconstructions, traversals, active units).
    fn posterior_mean(&self, input: &Input<'_>) -> Result<Tensor>;

    /// The mean of p(x|z) for latents `z` (N, latent_dim): (N, D).
    fn decode_mean(&self, z: &Tensor) -> Result<Tensor>;
}
