//! `elbo train`: a run in this process (world 1 of the shared loop), or — with
//! `cluster.workers > 1` — a coordinator here and the workers as child processes
//! ([`crate::launch`]). Either way the run directory is resumed when it holds a checkpoint, and
//! a finished run is evaluated and drawn.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use elbo_datasets::{Batch, Cursor};
use elbo_models::Metrics as Figures;
use elbo_settings::Config;
use elbo_worker::checkpoint::{self, Files};
use elbo_worker::{LocalReduce, StepReport, Trainer};

use crate::build::{device, Engine};
use crate::error::{EngineError, Result};
use crate::eval::evaluate;
use crate::job::Job;
use crate::pictures::write_pictures;
use crate::progress::{self, StepLine, Window};
use crate::run_dir::{self, Metrics};
use crate::signal::StopSignal;
use crate::steps::{self, Driver, Share};

/// How to run `elbo train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Device: `cpu` or `cuda:N`.
    pub device: String,
    /// Resume even if the config differs from the checkpoint's.
    pub force: bool,
    /// Stop after this many global steps (with a checkpoint).
    pub max_steps: Option<u64>,
    /// The `elbo` executable, started as `elbo worker` for local workers.
    pub exe: PathBuf,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps trained by this invocation.
    pub steps: u64,
    /// Wall-clock seconds it took.
    pub seconds: f64,
    /// Global batch rows per second.
    pub samples_per_s: f64,
    /// Workers of the last generation (1 in one process).
    pub world: u32,
    /// Generation of the last ring (distributed runs).
    pub generation: Option<u64>,
    /// The global step the run stands at.
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// The newest checkpoint's directory.
    pub checkpoint: PathBuf,
    /// The global step of the newest checkpoint.
    pub checkpoint_step: u64,
    /// A stop signal ended it early.
    pub interrupted: bool,
    /// Test figures of the finished model (when the run is complete).
    pub test: Option<Figures>,
}

/// `elbo train`: trains the run `cfg` describes, resuming its directory's newest checkpoint.
pub fn train(
    engine: &Engine,
    cfg: Config,
    options: &TrainOptions,
    stop: &StopSignal,
) -> Result<TrainSummary> {
    let device = device(&options.device)?;
    let job = Job::prepare(engine, cfg)?;
    if job.cfg.cluster.workers > 1 {
        return crate::launch::train(&job, options, &device, stop);
    }
    let cfg = &job.cfg;
    let run_dir = PathBuf::from(&cfg.run.dir);
    let mut trainer = job.trainer(&device)?;
    let mut cursor = Cursor::start(0);
    let newest = checkpoint::newest(&run_dir)?;
    if let Some((dir, files)) = &newest {
        let old = engine.run_config(&run_dir)?;
        run_dir::check_resume_config(&old, cfg, options.force)?;
        cursor = job.restore(&mut trainer, files, dir)?;
        tracing::info!(checkpoint = %dir.display(), step = trainer.step(), "resuming");
    }
    run_dir::write_config(&run_dir, cfg)?;
    let stop_at = options.max_steps.unwrap_or(u64::MAX).min(job.total_steps);
    tracing::info!(run_dir = %run_dir.display(), rows = job.train.rows(), steps = job.total_steps, params = trainer.layout().len(), "training");
    let mut driver = Local {
        job: &job,
        metrics: Metrics::open(&run_dir, newest.as_ref().map(|_| trainer.step()))?,
        bar: progress::bar(job.total_steps, trainer.step()),
        window: Window::default(),
        writing: None,
        stop,
    };
    let (started, start_step) = (Instant::now(), trainer.step());
    let share = Share {
        world: 1,
        rank: 0,
        stop_at,
    };
    steps::train(
        &job,
        &mut trainer,
        &mut cursor,
        share,
        &mut LocalReduce,
        &device,
        &mut driver,
    )?;
    driver.bar.finish_and_clear();
    if let Some(previous) = driver.writing.take() {
        written(previous)?;
    }
    let keep = cfg.train.keep_checkpoints as usize;
    let dir = checkpoint::write(&run_dir, &job.checkpoint_files(&trainer, cursor)?, keep)?;
    let seconds = started.elapsed().as_secs_f64();
    let steps = trainer.step() - start_step;
    let test = if trainer.step() >= job.total_steps {
        Some(finish(&job, trainer.model(), &device)?)
    } else {
        None
    };
    Ok(TrainSummary {
        steps,
        seconds,
        samples_per_s: steps as f64 * cfg.train.batch_size as f64 / seconds.max(1e-9),
        world: 1,
        generation: None,
        step: trainer.step(),
        total_steps: job.total_steps,
        checkpoint: dir,
        checkpoint_step: trainer.step(),
        interrupted: stop.raised(),
        test,
    })
}

/// The end of a finished run: its test figures and its pictures.
pub(crate) fn finish(
    job: &Job,
    model: &dyn elbo_models::Model,
    device: &Device,
) -> Result<Figures> {
    let figures = evaluate(model, &job.test, &job.cfg, device, None)?;
    write_pictures(
        model,
        &job.test,
        &job.cfg,
        Path::new(&job.cfg.run.dir),
        device,
    )?;
    Ok(figures)
}

type Writing = JoinHandle<Result<PathBuf>>;

fn written(writing: Writing) -> Result<PathBuf> {
    writing
        .join()
        .map_err(|_| EngineError::Failed("the checkpoint writer panicked".into()))?
}

/// The single process around each step: the progress bar and metrics, checkpoints written (and
/// fsynced) on a thread of their own while training goes on, one at a time, and the stop signal
/// (SIGTERM, what Kubernetes sends before eviction, or Ctrl-C): finish the step, checkpoint,
/// exit 0; the same command resumes.
struct Local<'a> {
    job: &'a Job,
    metrics: Metrics,
    bar: indicatif::ProgressBar,
    window: Window,
    writing: Option<Writing>,
    stop: &'a StopSignal,
}

impl Driver for Local<'_> {
    type Stop = ();

    fn before(&mut self, _: u64, _: &Batch, _: Duration) -> Result<Option<()>> {
        Ok(None)
    }

    fn after(
        &mut self,
        trainer: &Trainer,
        report: &StepReport,
        batch: &Batch,
        cursor: Cursor,
        _: Duration,
    ) -> Result<Option<()>> {
        let cfg = &self.job.cfg;
        self.window.add(batch.rows() as u64, report.applied);
        let step = trainer.step();
        if step % cfg.train.log_every == 0 || step == self.job.total_steps {
            let rec = self.window.record(&StepLine {
                step,
                epoch: cursor.epoch,
                lr: report.lr,
                grad_norm: report.grad_norm,
                terms: &report.terms,
            });
            progress::show(&self.bar, &rec, "");
            self.metrics.log(&rec)?;
        }
        self.bar.set_position(step);
        if cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0 {
            if let Some(previous) = self.writing.take() {
                written(previous)?;
            }
            let files: Files = self.job.checkpoint_files(trainer, cursor)?;
            let (dir, keep) = (
                PathBuf::from(&cfg.run.dir),
                cfg.train.keep_checkpoints as usize,
            );
            self.writing = Some(std::thread::spawn(move || {
                Ok(checkpoint::write(&dir, &files, keep)?)
            }));
        }
        Ok(self.stop.raised().then_some(()))
    }
}
