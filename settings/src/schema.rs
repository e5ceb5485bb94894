//! The typed configuration tree and its built-in defaults. Enumerated choices are the
//! libraries' own types (one definition per concept); the optimiser and the learning-rate
//! schedule are defined here and used by the trainer.

use elbo_datasets::Binarize;
use elbo_models::{Activation, Architecture, LikelihoodKind};
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
    /// Evaluation.
    pub eval: EvalConfig,
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
    /// Keep the labels of this many training rows per class, chosen by a seeded rule that does
    /// not depend on the world size, and treat the other rows as unlabeled (0: keep every
    /// label). For semi-supervised models.
    pub labeled_per_class: u64,
    /// Labeled rows in every global batch, drawn from the kept labeled rows (cycled as often as
    /// an epoch of the unlabeled rows needs) beside `train.batch_size` minus this many
    /// unlabeled rows; every row of the data then counts as unlabeled once an epoch (0: batches
    /// take rows as they come).
    pub labeled_per_batch: u64,
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

/// `[train]`: the optimisation loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Global minibatch size, summed over all workers.
    pub batch_size: u64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay: an L2 term for adam and sgd, decoupled for adamw.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    pub clip_norm: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Warm-up steps of the schedule.
    pub warmup_steps: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: u32,
    /// Stop after this many non-finite steps in a row.
    pub max_nonfinite: u32,
    /// Log a metrics line every this many steps.
    pub log_every: u64,
}

/// Learning-rate schedules (the shape; `train.warmup_steps` and the run's length complete it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// A linear ramp over `train.warmup_steps`, then constant.
    LinearWarmup,
    /// A linear ramp, then cosine decay to 0 at the end of the run.
    Cosine,
}

/// Optimisers (the trainer's update rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam (Kingma & Ba); weight decay, if any, is an L2 term added to the gradient.
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
    /// SGD with (heavy-ball) momentum.
    Sgd,
}

/// `[model]`: the keys common to the model family, and the selected variant's own section
/// `[model.<kind>]`.
///
/// Unknown keys are refused by the loader before this is deserialised (the variants' section
/// keys come from the registry), so no `deny_unknown_fields` here: the section is read apart,
/// and written back by [`Config::to_value`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The variant (a kind in the model registry, e.g. `vae`).
    pub kind: String,
    /// Dimension of the (top) latent variable.
    pub latent_dim: u32,
    /// Encoder/decoder family: `mlp` or `conv` (28, 32 or 64 pixel square images).
    pub architecture: Architecture,
    /// Hidden layer sizes of the encoder (the decoder mirrors them). A single number is one
    /// layer (so `ELBO__MODEL__HIDDEN=400` works as well as `=400,300`).
    #[serde(deserialize_with = "one_or_many")]
    pub hidden: Vec<u32>,
    /// Nonlinearity.
    pub activation: Activation,
    /// Observation model.
    pub likelihood: LikelihoodKind,
    /// Variance of the `gaussian_fixed` likelihood.
    pub variance: f64,
    /// Weight of the KL term (1 = VAE, > 1 = β-VAE).
    pub beta: f64,
    /// Steps over which the KL weight rises linearly from 0 to β (0 = off).
    pub kl_warmup_steps: u64,
    /// Free bits per latent dimension, in nats (0 = off).
    pub free_bits: f64,
    /// Clamp of the posterior log-variance (±).
    pub log_var_clamp: f64,
    /// The selected variant's section `[model.<kind>]`, typed and checked by the loader (absent
    /// when the variant has no keys of its own).
    #[serde(skip)]
    pub section: Option<toml::Table>,
}

impl ModelConfig {
    /// The selected variant's section (empty when it has no keys).
    pub fn section(&self) -> toml::Table {
        self.section.clone().unwrap_or_default()
    }
}

/// `[eval]`: evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Importance samples of the IWAE bound (`elbo eval`).
    pub iw_samples: u32,
    /// Examples per evaluation batch.
    pub batch_size: u64,
    /// Global steps between the test-set figures logged during training (`test_*` keys in
    /// metrics.jsonl, and the test curve of loss.png); 0: at the end of each epoch. A finished
    /// run's last step always gets them.
    pub every: u64,
}

/// `[cluster]`: distributed execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Number of workers `elbo train` starts on this machine, and the world size the
    /// coordinator waits for.
    pub workers: u32,
    /// The coordinator starts with fewer workers than `cluster.workers` once the rendezvous
    /// timeout passes, but never with fewer than this.
    pub min_workers: u32,
    /// Seconds the coordinator waits for workers to join before it starts with at least
    /// `cluster.min_workers` (or gives up).
    pub rendezvous_timeout_s: f64,
    /// Seconds without a heartbeat after which a worker counts as lost.
    pub heartbeat_timeout_s: f64,
    /// Seconds a worker waits for a peer's gradient chunk before it gives up on the step.
    pub step_timeout_s: f64,
    /// Every this many steps each worker reports a checksum of its parameters and the
    /// coordinator stops the run if replicas differ (0 = never).
    pub checksum_every: u64,
    /// Largest gradient chunk sent between ring neighbours, in KiB.
    pub ring_chunk_kib: u64,
    /// Chunks of its own segment each worker keeps on their way around the ring at once.
    /// 1 suits workers that share cores (one machine, more workers than cores); raise it for
    /// links with a long round trip.
    pub ring_depth: u64,
    /// `elbo train` restarts a local worker that dies (killed by a signal); the run survives
    /// the loss either way while `cluster.min_workers` remain.
    pub restart_workers: bool,
    /// Seconds a worker keeps trying to reach a lost coordinator (with exponential backoff)
    /// before it gives up.
    pub reconnect_timeout_s: f64,
    /// TLS on every connection of the run.
    pub tls: TlsConfig,
}

/// `[cluster.tls]`: TLS (rustls) on the coordinator's and the workers' servers and on every
/// client that dials them. Off while `cert`, `key` and `ca` are empty; on when all three name
/// PEM files (cert-manager's `tls.crt`, `tls.key`, `ca.crt`). `elbo worker` takes the same
/// settings from its flags (`--tls-cert`, … or `ELBO_TLS_*`): it needs them before the
/// coordinator sends it this config. The default is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This end's certificate chain (PEM).
    pub cert: String,
    /// Its private key (PEM).
    pub key: String,
    /// The CA that signs every certificate of the run (PEM): the only root trusted.
    pub ca: String,
    /// Servers demand a client certificate signed by `ca` (mutual TLS).
    pub mutual: bool,
    /// The name every server's certificate is checked against; empty: the host dialled (the
    /// coordinator URL's host, a peer's IP address).
    pub server_name: String,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !(self.cert.is_empty() && self.key.is_empty() && self.ca.is_empty())
    }
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
                labeled_per_class: 0,
                labeled_per_batch: 0,
                sprites: SpritesConfig {
                    n: 20_000,
                    size: 32,
                    seed: 0,
                },
            },
            train: TrainConfig {
                epochs: 10,
                batch_size: 128,
                optimizer: OptimizerKind::Adam,
                lr: 1e-3,
                weight_decay: 0.0,
                momentum: 0.9,
                clip_norm: 0.0,
                lr_schedule: LrSchedule::Constant,
                warmup_steps: 0,
                checkpoint_every: 1000,
                keep_checkpoints: 3,
                max_nonfinite: 10,
                log_every: 50,
            },
            model: ModelConfig {
                kind: "vae".into(),
                latent_dim: 16,
                architecture: Architecture::Mlp,
                hidden: vec![400],
                activation: Activation::Relu,
                likelihood: LikelihoodKind::Bernoulli,
                variance: 1.0,
                beta: 1.0,
                kl_warmup_steps: 0,
                free_bits: 0.0,
                log_var_clamp: 10.0,
                section: None,
            },
            cluster: ClusterConfig {
                workers: 1,
                min_workers: 1,
                rendezvous_timeout_s: 120.0,
                heartbeat_timeout_s: 5.0,
                step_timeout_s: 120.0,
                checksum_every: 50,
                ring_chunk_kib: 256,
                ring_depth: 1,
                restart_workers: true,
                reconnect_timeout_s: 300.0,
                tls: TlsConfig::default(),
            },
            eval: EvalConfig {
                iw_samples: 100,
                batch_size: 100,
                every: 0,
            },
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a layer size or a list of layer sizes")]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Text(String),
    }
    match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => Ok(vec![n]),
        OneOrMany::Many(v) => Ok(v),
        OneOrMany::Text(t) => t
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a layer size or a list of layer sizes"
                ))
            }),
    }
}
