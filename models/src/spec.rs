//! What every model variant is built from: the `[model]` keys common to the family and the
//! shape of the data.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::layers::Activation;
use crate::likelihood::LikelihoodKind;
use crate::objective::Objective;

/// Encoder/decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Dense layers on the flattened example.
    Mlp,
    /// Stride-2 convolutions (28, 32 or 64 pixel square images).
    Conv,
}

/// The common shape of a model: data, trunk, latent, likelihood and objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Example shape, e.g. `[1, 28, 28]`.
    pub input_shape: Vec<usize>,
    /// Latent dimension (the top layer's, for hierarchical models).
    pub latent_dim: usize,
    /// Encoder/decoder family.
    pub architecture: Architecture,
    /// Hidden layer sizes of the MLP encoder (the decoder mirrors them); for `Conv`, the
    /// dense layers between the convolutions and the latent.
    pub hidden: Vec<usize>,
    /// Nonlinearity.
    pub activation: Activation,
    /// Observation model.
    pub likelihood: LikelihoodKind,
    /// Variance of `GaussianFixed`.
    pub variance: f64,
    /// The posterior log-variance is clamped to ±this.
    pub log_var_clamp: f64,
    /// The training objective (β, KL warm-up, free bits).
    pub objective: Objective,
}

/// Where and from what seed a model is built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The device its parameters live on.
    pub device: Device,
    /// The run seed: parameter initialisation is drawn from it.
    pub seed: u64,
}
