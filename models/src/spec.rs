//! What every model variant is built from: the `[model]` keys common to the family and the
//! shape of the data.

use std::fmt;
use std::sync::Mutex;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::layers::Activation;
use crate::likelihood::LikelihoodKind;
use crate::model::Model;
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

/// Where and from what seed a model is built, and the trained model it builds on, if any.
#[derive(Debug)]
pub struct BuildContext {
    /// The device its parameters live on.
    pub device: Device,
    /// The run seed: parameter initialisation is drawn from it.
    pub seed: u64,
    /// The trained model of the run its section names as its base ([`crate::Section::base_run`]),
    /// loaded by the program; a variant that needs it takes it once.
    pub base: BaseModel,
}

impl BuildContext {
    /// A context without a base model.
    pub fn new(device: Device, seed: u64) -> Self {
        BuildContext {
            device,
            seed,
            base: BaseModel::default(),
        }
    }
}

/// The slot of a base model: filled by the program, taken by the variant that reads it.
#[derive(Default)]
pub struct BaseModel(Mutex<Option<Box<dyn Model>>>);

impl BaseModel {
    /// A slot holding `model`.
    pub fn new(model: Box<dyn Model>) -> Self {
        BaseModel(Mutex::new(Some(model)))
    }

    /// Takes the model out of the slot (`None` if it was empty or already taken).
    pub fn take(&self) -> Option<Box<dyn Model>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.0.lock().map(|m| m.is_some()).unwrap_or(false);
        write!(f, "BaseModel({})", if held { "held" } else { "empty" })
    }
}
