//! What every process of a run derives from its config alone: the data, the world-independent
//! data plan, the step count and a freshly seeded trainer. A single-process run, each worker
//! and the launcher all start here, so they agree by construction.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use elbo_datasets::sprites::Split;
use elbo_datasets::{label_counts, Cursor, DataPlan, Dataset, LabeledSet};
use elbo_models::LabelUse;
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
    /// The data's labels were checked against what the model needs of them.
    labels_checked: OnceLock<()>,
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
        let per_batch = cfg.data.labeled_per_batch;
        let mut plan = train
            .plan(
                cfg.run.seed,
                cfg.train.batch_size - per_batch,
                cfg.data.shuffle_window,
                true,
            )
            .map_err(data("cannot plan data.train"))?;
        if cfg.data.labeled_per_class > 0 || per_batch > 0 {
            let what = || {
                format!(
                    "cannot choose the labeled rows of data.train = {:?}",
                    cfg.data.train
                )
            };
            let mut set = LabeledSet::select(&train, cfg.data.labeled_per_class, cfg.run.seed)
                .map_err(data(what()))?;
            if per_batch > 0 {
                set.load(&train).map_err(data(what()))?;
            }
            tracing::info!(rows = set.len(), per_class = ?set.per_class(), per_batch, "labels kept");
            plan = plan
                .with_labeled(Arc::new(set), per_batch)
                .map_err(data(what()))?;
        }
        let total_steps = cfg.train.epochs * plan.steps_per_epoch();
        Ok(Job {
            engine: engine.clone(),
            config_sha256: run_dir::config_sha256(&cfg),
            cfg,
            train,
            test,
            plan,
            total_steps,
            labels_checked: OnceLock::new(),
        })
    }

    /// A trainer with the model's initial parameters (the first time, after checking the
    /// data's labels against what the model needs of them).
    pub fn trainer(&self, device: &Device) -> Result<Trainer> {
        let model = self.engine.model(&self.cfg, self.train.schema(), device)?;
        if self.labels_checked.get().is_none() {
            self.check_labels(model.labels())?;
            let _ = self.labels_checked.set(());
        }
        Ok(Trainer::new(
            model,
            step_config(&self.cfg, self.total_steps),
        )?)
    }

    /// Refuses, before training, data whose labels the model cannot use: a conditional model
    /// needs a label on every row, a semi-supervised one labeled training rows, and both labels
    /// below their number of classes.
    fn check_labels(&self, needs: LabelUse) -> Result<()> {
        let Some(classes) = needs.classes() else {
            return Ok(());
        };
        let kind = &self.cfg.model.kind;
        for (key, ds) in [("data.train", &self.train), ("data.test", &self.test)] {
            let what = format!("cannot read the labels of {key} = {:?}", ds.spec());
            let counts = label_counts(ds).map_err(data(what))?;
            let refuse = |why: String| {
                EngineError::Invalid(format!(
                    "model.kind = {kind:?} {why} ({key} = {:?})",
                    ds.spec()
                ))
            };
            if let Some((&top, _)) = counts.histogram.last_key_value() {
                if top >= classes as i64 {
                    return Err(refuse(format!(
                        "has {classes} classes, but {key} holds label {top}: set the model's classes to at least {}",
                        top + 1
                    )));
                }
            }
            match needs {
                LabelUse::Every { .. } if counts.unlabeled > 0 => {
                    return Err(refuse(format!(
                        "needs a label on every row, but {key} has {} unlabeled rows of {}",
                        counts.unlabeled,
                        counts.labeled + counts.unlabeled
                    )))
                }
                LabelUse::Partial { .. } if key == "data.train" && counts.labeled == 0 => {
                    return Err(refuse(format!("needs labeled rows, but {key} has none")));
                }
                _ => {}
            }
            tracing::info!(data = key, labeled = counts.labeled, unlabeled = counts.unlabeled, per_class = ?counts.histogram, "labels");
        }
        Ok(())
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
