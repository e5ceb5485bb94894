//! What every process of a run derives from its config alone: the data, the world-independent
//! data plan, the step count and a freshly seeded trainer. A single-process run, each worker
//! and the launcher all start here, so they agree by construction.

use std::sync::Arc;

use candle_core::Device;
use elbo_datasets::sprites::Split;
use elbo_datasets::{Cursor, DataPlan, Dataset};
use elbo_settings::Config;
use elbo_worker::checkpoint::Files;
use elbo_worker::Trainer;

use crate::build::{step_config, Engine};
use crate::error::{data, EngineError, Result};
use crate::run_dir;

/// A run's data and plan.
pub struct Job {
    /// The engine it runs in.
    pub engine: Engine,
    /// The resolved config.
    pub cfg: Config,
    /// Training data.
    pub train: Arc<Dataset>,
    /// Test data.
    pub test: Arc<Dataset>,
    /// The data plan of every epoch.
    pub plan: DataPlan,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// SHA-256 of the config, recorded in checkpoints.
    pub config_sha256: String,
}

impl Job {
    /// Opens the data (generating the built-in set on first use) and plans the epochs.
    pub fn prepare(engine: &Engine, cfg: Config) -> Result<Job> {
        if cfg.train.batch_size < u64::from(cfg.cluster.workers) {
            return Err(EngineError::Invalid(format!(
                "train.batch_size = {} is smaller than cluster.workers = {}: every worker needs rows of each global batch",
                cfg.train.batch_size, cfg.cluster.workers
            )));
        }
        let train = engine.dataset(&cfg, Split::Train)?;
        let test = engine.dataset(&cfg, Split::Test)?;
        if train.schema().shape != test.schema().shape {
            return Err(EngineError::Invalid(format!(
                "data.train holds examples of shape {:?} but data.test {:?}",
                train.schema().shape,
                test.schema().shape
            )));
        }
        let plan = train
            .plan(
                cfg.run.seed,
                cfg.train.batch_size,
                cfg.data.shuffle_window,
                true,
            )
            .map_err(data("cannot plan data.train"))?;
        let total_steps = cfg.train.epochs * plan.steps_per_epoch();
        Ok(Job {
            engine: engine.clone(),
            config_sha256: run_dir::config_sha256(&cfg),
            cfg,
            train,
            test,
            plan,
            total_steps,
        })
    }

    /// A trainer with the model's initial parameters.
    pub fn trainer(&self, device: &Device) -> Result<Trainer> {
        let model = self.engine.model(&self.cfg, self.train.schema(), device)?;
        Ok(Trainer::new(
            model,
            step_config(&self.cfg, self.total_steps),
        )?)
    }

    /// The cursor at the end of an epoch is the start of the next.
    pub fn normalise(&self, cursor: Cursor) -> Cursor {
        if cursor.step >= self.plan.steps_per_epoch() {
            Cursor::start(cursor.epoch + 1)
        } else {
            cursor
        }
    }

    /// The trainer's state with the data cursor after its last step, as checkpoint files.
    pub fn checkpoint_files(&self, trainer: &Trainer, cursor: Cursor) -> Result<Files> {
        Ok(trainer.checkpoint_files(cursor, self.cfg.run.seed, &self.config_sha256)?)
    }

    /// Puts checkpoint files (read from `origin`) into the trainer; returns the data cursor to
    /// continue from.
    pub fn restore(
        &self,
        trainer: &mut Trainer,
        files: &Files,
        origin: &std::path::Path,
    ) -> Result<Cursor> {
        let ck = trainer.decode(files, origin)?;
        Ok(self.normalise(trainer.restore(ck)?))
    }
}
