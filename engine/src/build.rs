//! From config to the objects of a run: the device, the data, the model, the step settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use elbo_datasets::sprites::{resolve_builtin, Split, SpritesParams};
use elbo_datasets::{Binarizer, DataSchema, Dataset};
use elbo_models::{BaseModel, BuildContext, Model, ModelSpec, Objective, Registry};
use elbo_settings::{self as settings, Config, Layers};
use elbo_worker::{OptimizerConfig, Schedule, StepConfig};

use crate::error::{data, EngineError, Result};

/// What a program hands the engine: the model variants it knows and where generated data (the
/// built-in sprites set) is cached.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The variants `model.kind` may select.
    pub registry: Arc<Registry>,
    /// The cache of generated data.
    pub cache_root: PathBuf,
}

impl Engine {
    /// An engine with these variants and this data cache.
    pub fn new(registry: Registry, cache_root: PathBuf) -> Self {
        Engine {
            registry: Arc::new(registry),
            cache_root,
        }
    }

    /// Resolves a config from its layers against this engine's variants.
    pub fn load_config(&self, layers: &Layers) -> Result<Config> {
        Ok(settings::load(layers, &self.registry)?)
    }

    /// Reads the config a run directory was started with.
    pub fn run_config(&self, run_dir: &Path) -> Result<Config> {
        let path = run_dir.join("config.toml");
        if !path.is_file() {
            return Err(EngineError::Invalid(format!(
                "{} has no config.toml: not a run directory (expected one written by elbo train)",
                run_dir.display()
            )));
        }
        self.load_config(&Layers {
            file: Some(path),
            ..Default::default()
        })
    }

    /// Opens a split of the configured data (generating the built-in set on first use).
    pub fn dataset(&self, cfg: &Config, split: Split) -> Result<Arc<Dataset>> {
        let (key, spec) = match split {
            Split::Train => ("data.train", &cfg.data.train),
            Split::Test => ("data.test", &cfg.data.test),
        };
        let s = &cfg.data.sprites;
        let params = SpritesParams {
            n: s.n,
            size: s.size,
            seed: s.seed,
        };
        let what = || format!("cannot open {key} = {spec:?}");
        let path = resolve_builtin(spec, split, &params, &self.cache_root).map_err(data(what()))?;
        Ok(Arc::new(Dataset::open(&path).map_err(data(what()))?))
    }

    /// Builds the model `model.kind` selects, for data of this schema, parameters drawn from
    /// the run seed.
    pub fn model(
        &self,
        cfg: &Config,
        schema: &DataSchema,
        device: &Device,
    ) -> Result<Box<dyn Model>> {
        let section = cfg.model.section();
        let mut ctx = BuildContext::new(device.clone(), cfg.run.seed);
        if let Some(base) = self.registry.base_run(&cfg.model.kind, &section)? {
            ctx.base =
                BaseModel::new(self.base_model(&cfg.model.kind, Path::new(&base), device)?);
        }
        let spec = model_spec(cfg, schema);
        Ok(self
            .registry
            .build(&cfg.model.kind, &spec, &section, &ctx)?)
    }

    /// The trained model of the run a `kind` model builds on, at its newest checkpoint.
    fn base_model(&self, kind: &str, run_dir: &Path, device: &Device) -> Result<Box<dyn Model>> {
        let context = |e: EngineError| {
            EngineError::Invalid(format!(
                "model.{kind}: cannot load the run it builds on, {}: {e}",
                run_dir.display()
            ))
        };
        let base_cfg = self.run_config(run_dir).map_err(context)?;
        let base_kind = &base_cfg.model.kind;
        if self
            .registry
            .base_run(base_kind, &base_cfg.model.section())?
            .is_some()
        {
            return Err(EngineError::Invalid(format!(
                "model.{kind}: {} is a {base_kind} run, which builds on another run itself; expected a run that stands alone",
                run_dir.display()
            )));
        }
        Ok(crate::eval::load_run(self, run_dir, device)
            .map_err(context)?
            .model)
    }
}

/// Parses `cpu` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device> {
    let bad = || EngineError::Invalid(format!("--device {spec:?}: expected cpu or cuda:N"));
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let index = match s.strip_prefix("cuda:") {
                Some(i) => i.parse::<usize>().map_err(|_| bad())?,
                None if s == "cuda" => 0,
                None => return Err(bad()),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::Invalid(format!(
                    "--device {s}: this elbo was built without CUDA (rebuild with --features cuda)"
                )));
            }
            Device::new_cuda(index)
                .map_err(|e| EngineError::Invalid(format!("cannot open CUDA device {index}: {e}")))
        }
        _ => Err(bad()),
    }
}

/// The binariser of the run.
pub fn binarizer(cfg: &Config) -> Binarizer {
    Binarizer::new(cfg.data.binarize, cfg.run.seed)
}

/// The common model specification for data of this schema.
pub fn model_spec(cfg: &Config, schema: &DataSchema) -> ModelSpec {
    let m = &cfg.model;
    ModelSpec {
        input_shape: schema.shape.clone(),
        latent_dim: m.latent_dim as usize,
        architecture: m.architecture,
        hidden: m.hidden.iter().map(|h| *h as usize).collect(),
        activation: m.activation,
        likelihood: m.likelihood,
        variance: m.variance,
        log_var_clamp: m.log_var_clamp,
        objective: Objective {
            beta: m.beta,
            warmup_steps: m.kl_warmup_steps,
            free_bits: m.free_bits,
        },
    }
}

/// Settings of the training step for a run of `total_steps`.
pub fn step_config(cfg: &Config, total_steps: u64) -> StepConfig {
    let t = &cfg.train;
    StepConfig {
        optimizer: OptimizerConfig {
            weight_decay: t.weight_decay,
            momentum: t.momentum,
            ..OptimizerConfig::defaults(t.optimizer)
        },
        lr: t.lr,
        schedule: Schedule {
            kind: t.lr_schedule,
            warmup: t.warmup_steps,
            total: total_steps,
        },
        clip_norm: t.clip_norm,
        max_nonfinite: t.max_nonfinite,
        seed: cfg.run.seed,
    }
}
