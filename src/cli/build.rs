//! From config to the objects of a run: device, data, model, training-step settings.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Device;
use elbo_datasets::sprites::{resolve_builtin, Split, SpritesParams};
use elbo_datasets::{Binarize, Binarizer, DataSchema, Dataset};
use elbo_models::{Activation, Architecture, LikelihoodKind, Objective, Vae, VaeSpec};
use elbo_settings::{self as settings, Config, ModelKind};
use elbo_worker::{OptimizerConfig, OptimizerKind, Schedule, StepConfig};

use super::layers::cache_root;

/// Parses `cpu` or `cuda:N`.
pub fn device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let index = s.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>);
            let index =
                index.map_err(|_| anyhow::anyhow!("--device {s:?}: expected cpu or cuda:N"))?;
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this elbo was built without CUDA (rebuild with --features cuda)"
                );
            }
            Device::new_cuda(index).with_context(|| format!("cannot open CUDA device {index}"))
        }
        other => bail!("--device {other:?}: expected cpu or cuda:N"),
    }
}

/// Refuses what this build cannot train yet, naming the key.
pub fn check_supported(cfg: &Config) -> anyhow::Result<()> {
    if !matches!(cfg.model.kind, ModelKind::Vae | ModelKind::BetaVae) {
        bail!(
            "model.kind = {:?} is not available yet; available: vae, beta_vae (a VAE with model.beta ≠ 1)",
            cfg.model.kind
        );
    }
    if cfg.train.batch_size < u64::from(cfg.cluster.workers) {
        bail!(
            "train.batch_size = {} is smaller than cluster.workers = {}: every worker needs rows of each global batch",
            cfg.train.batch_size,
            cfg.cluster.workers
        );
    }
    Ok(())
}

/// Opens a split of the configured data (generating the built-in set on first use).
pub fn dataset(cfg: &Config, split: Split) -> anyhow::Result<Arc<Dataset>> {
    let spec = match split {
        Split::Train => &cfg.data.train,
        Split::Test => &cfg.data.test,
    };
    let s = &cfg.data.sprites;
    let params = SpritesParams {
        n: s.n,
        size: s.size,
        seed: s.seed,
    };
    let path = resolve_builtin(spec, split, &params, &cache_root())?;
    let key = if split == Split::Train {
        "data.train"
    } else {
        "data.test"
    };
    Ok(Arc::new(Dataset::open(&path).with_context(|| {
        format!("cannot open {key} = {spec:?}")
    })?))
}

/// The binariser of the run.
pub fn binarizer(cfg: &Config) -> Binarizer {
    let mode = match cfg.data.binarize {
        settings::Binarize::None => Binarize::None,
        settings::Binarize::Static => Binarize::Static,
        settings::Binarize::Dynamic => Binarize::Dynamic,
    };
    Binarizer::new(mode, cfg.run.seed)
}

/// The model specification for data of this schema.
pub fn vae_spec(cfg: &Config, schema: &DataSchema) -> VaeSpec {
    let m = &cfg.model;
    VaeSpec {
        input_shape: schema.shape.clone(),
        latent_dim: m.latent_dim as usize,
        architecture: match m.architecture {
            settings::Architecture::Mlp => Architecture::Mlp,
            settings::Architecture::Conv => Architecture::Conv,
        },
        hidden: m.hidden.iter().map(|h| *h as usize).collect(),
        activation: match m.activation {
            settings::Activation::Relu => Activation::Relu,
            settings::Activation::Tanh => Activation::Tanh,
            settings::Activation::Gelu => Activation::Gelu,
        },
        likelihood: match m.likelihood {
            settings::Likelihood::Bernoulli => LikelihoodKind::Bernoulli,
            settings::Likelihood::GaussianFixed => LikelihoodKind::GaussianFixed,
            settings::Likelihood::GaussianGlobal => LikelihoodKind::GaussianGlobal,
            settings::Likelihood::GaussianPerDim => LikelihoodKind::GaussianPerDim,
        },
        variance: m.variance,
        log_var_clamp: m.log_var_clamp,
    }
}

/// Builds the model with parameters drawn from the run seed.
pub fn model(cfg: &Config, schema: &DataSchema, device: &Device) -> anyhow::Result<Vae> {
    Vae::new(vae_spec(cfg, schema), device, cfg.run.seed).context("invalid [model] settings")
}

/// The objective.
pub fn objective(cfg: &Config) -> Objective {
    Objective {
        beta: cfg.model.beta,
        warmup_steps: cfg.model.kl_warmup_steps,
        free_bits: cfg.model.free_bits,
    }
}

/// Settings of the training step for a run of `total_steps`.
pub fn step_config(cfg: &Config, total_steps: u64) -> StepConfig {
    let t = &cfg.train;
    let kind = match t.optimizer {
        settings::Optimizer::Adam => OptimizerKind::Adam,
        settings::Optimizer::Adamw => OptimizerKind::Adamw,
        settings::Optimizer::Sgd => OptimizerKind::Sgd,
    };
    StepConfig {
        objective: objective(cfg),
        optimizer: OptimizerConfig {
            weight_decay: t.weight_decay,
            momentum: t.momentum,
            ..OptimizerConfig::defaults(kind)
        },
        lr: t.lr,
        schedule: match t.lr_schedule {
            settings::LrSchedule::Constant => Schedule::Constant,
            settings::LrSchedule::LinearWarmup => Schedule::LinearWarmup {
                warmup: t.warmup_steps,
            },
            settings::LrSchedule::Cosine => Schedule::Cosine {
                warmup: t.warmup_steps,
                total: total_steps,
            },
        },
        clip_norm: t.clip_norm,
        max_nonfinite: t.max_nonfinite,
        seed: cfg.run.seed,
    }
}

/// Reads the config a run was started with.
pub fn run_config(run_dir: &Path) -> anyhow::Result<Config> {
    let path = run_dir.join("config.toml");
    if !path.is_file() {
        bail!(
            "{} has no config.toml: not a run directory (expected one written by elbo train)",
            run_dir.display()
        );
    }
    let layers = settings::Layers {
        file: Some(path.clone()),
        ..Default::default()
    };
    settings::load(&layers).with_context(|| format!("cannot read {}", path.display()))
}
