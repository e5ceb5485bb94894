//! The typed configuration tree and its built-in defaults.

use serde::{Deserialize, Serialize};

/// The whole run configuration, as resolved from all layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and location of the run.
    pub run: RunConfig,
    /// Training and test data.
    pub data: DataConfig,
    /// Optimisation loop.
    pub train: TrainConfig,
    /// Model family and size.
    pub model: ModelConfig,
    /// Distributed execution.
    pub cluster: ClusterConfig,
}

/// `[run]`: identity and location of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the run; the default run directory is `runs/<name>`.
    pub name: String,
    /// The run directory. Empty means `runs/<run.name>`; resolved on load.
    pub dir: String,
    /// Seed from which every random choice of the run is derived.
    pub seed: u64,
}

/// `[data]`: training and test data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training set: a Parquet file, a directory, a glob, or `builtin:sprites`.
    pub train: String,
    /// Test set, in the same forms as `data.train`.
    pub test: String,
    /// How pixel intensities in [0, 1] are binarised before training.
    pub binarize: Binarize,
    /// Rows shuffled together (the bounded shuffle window of the data plan).
    pub shuffle_window: u64,
    /// The built-in procedural sprites set, used when a split is `builtin:sprites`.
    pub sprites: SpritesConfig,
}

/// `[data.sprites]`: size of the built-in procedural data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpritesConfig {
    /// Number of training images (the test split has a tenth as many more).
    pub n: u64,
    /// Side of the square images in pixels: 32 or 64.
    pub size: u32,
    /// Seed of the generator (independent of `run.seed`, so runs share data).
    pub seed: u64,
}

/// Binarisation of [0, 1] intensities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binarize {
    /// Use intensities as they are.
    None,
    /// One Bernoulli draw per pixel, fixed for the whole run.
    Static,
    /// A fresh Bernoulli draw per pixel on every visit (seeded, reproducible).
    Dynamic,
}

/// `[train]`: the optimisation loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Global minibatch size, summed over all workers.
    pub batch_size: u64,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Learning rate.
    pub lr: f64,
}

/// Optimisers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam (Kingma & Ba).
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
    /// SGD with momentum.
    Sgd,
}

/// `[model]`: model family and size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model family.
    pub kind: ModelKind,
    /// Dimension of the (top) latent variable.
    pub latent_dim: u32,
}

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// VAE with analytic KL.
    Vae,
    /// β-VAE.
    BetaVae,
    /// Conditional VAE.
    Cvae,
    /// Semi-supervised VAE (Kingma et al.'s M2).
    M2,
    /// Vector-quantised VAE.
    Vqvae,
    /// Hierarchical VAE.
    Hvae,
}

/// `[cluster]`: distributed execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Number of workers `elbo train` starts on this machine.
    pub workers: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            run: RunConfig {
                name: "default".into(),
                dir: String::new(),
                seed: 0,
            },
            data: DataConfig {
                train: "builtin:sprites".into(),
                test: "builtin:sprites".into(),
                binarize: Binarize::None,
                shuffle_window: 16_384,
                sprites: SpritesConfig {
                    n: 20_000,
                    size: 32,
                    seed: 0,
                },
            },
            train: TrainConfig {
                epochs: 10,
                batch_size: 128,
                optimizer: Optimizer::Adam,
                lr: 1e-3,
            },
            model: ModelConfig {
                kind: ModelKind::Vae,
                latent_dim: 16,
            },
            cluster: ClusterConfig { workers: 1 },
        }
    }
}

/// The accepted values of the keys whose type is an enum.
pub(crate) fn choices(key: &str) -> Option<&'static [&'static str]> {
    match key {
        "data.binarize" => Some(&["none", "static", "dynamic"]),
        "train.optimizer" => Some(&["adam", "adamw", "sgd"]),
        "model.kind" => Some(&["vae", "beta_vae", "cvae", "m2", "vqvae", "hvae"]),
        _ => None,
    }
}
