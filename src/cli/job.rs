//! What every process of a run derives from its config alone: the data, the world-independent
//! data plan, the step count and a freshly seeded trainer. A single-process run, each worker
//! and the launcher all start here, so they agree by construction.

use std::sync::Arc;

use candle_core::Device;
use elbo_datasets::sprites::Split;
use elbo_datasets::{Cursor, DataPlan, Dataset};
use elbo_settings::Config;
use elbo_worker::checkpoint::{self, Checkpoint, Files, TrainState};
use elbo_worker::Trainer;

use super::build;
use super::run_dir;

/// A run's data and plan.
pub struct Job {
    pub cfg: Config,
    pub train: Arc<Dataset>,
    pub test: Arc<Dataset>,
    pub plan: DataPlan,
    pub total_steps: u64,
    /// SHA-256 of the config, recorded in checkpoints.
    pub config_sha256: String,
}

impl Job {
    /// Opens the data (generating the built-in set on first use) and plans the epochs.
    pub fn prepare(cfg: Config) -> anyhow::Result<Job> {
        build::check_supported(&cfg)?;
        let train = build::dataset(&cfg, Split::Train)?;
        let test = build::dataset(&cfg, Split::Test)?;
        if train.schema().shape != test.schema().shape {
            anyhow::bail!(
                "data.train holds examples of shape {:?} but data.test {:?}",
                train.schema().shape,
                test.schema().shape
            );
        }
        let plan = train.plan(
            cfg.run.seed,
            cfg.train.batch_size,
            cfg.data.shuffle_window,
            true,
        )?;
        let total_steps = cfg.train.epochs * plan.steps_per_epoch();
        Ok(Job {
            config_sha256: run_dir::config_sha256(&cfg),
            cfg,
            train,
            test,
            plan,
            total_steps,
        })
    }

    /// A trainer with the model's initial parameters.
    pub fn trainer(&self, device: &Device) -> anyhow::Result<Trainer> {
        let model = build::model(&self.cfg, self.train.schema(), device)?;
        Ok(Trainer::new(
            Box::new(model),
            build::step_config(&self.cfg, self.total_steps),
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
    pub fn checkpoint_files(&self, trainer: &Trainer, cursor: Cursor) -> anyhow::Result<Files> {
        let state = TrainState {
            format: checkpoint::FORMAT,
            step: trainer.step(),
            cursor,
            nonfinite_total: trainer.nonfinite_total(),
            optimizer_step: trainer.optimizer().state().step,
            seed: self.cfg.run.seed,
            config_sha256: self.config_sha256.clone(),
        };
        Ok(checkpoint::encode(
            trainer.layout(),
            trainer.params(),
            trainer.optimizer().state(),
            &state,
        )?)
    }
}

/// Puts a checkpoint's parameters, optimiser state and counters into the trainer; returns the
/// data cursor to continue from.
pub fn restore(trainer: &mut Trainer, ck: Checkpoint) -> anyhow::Result<Cursor> {
    trainer.restore(
        ck.params,
        ck.optimizer,
        ck.state.step,
        ck.state.nonfinite_total,
    )?;
    Ok(ck.state.cursor)
}
