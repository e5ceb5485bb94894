//! A run in this process: world 1 of the shared loop, resuming the run directory's newest
//! checkpoint, evaluated and drawn when it is finished.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use elbo_datasets::{Batch, Cursor};
use elbo_models::Metrics as Figures;
use elbo_worker::checkpoint::{self, Files};
use elbo_worker::{LocalReduce, StepReport, Trainer};

use crate::error::{EngineError, Result};
use crate::eval::{scalars, test_due, test_figures, test_record};
use crate::job::Job;
use crate::progress::{self, StepLine, Window};
use crate::run_dir::{self, Metrics};
use crate::signal::StopSignal;
use crate::steps::{self, Driver, Share};
use crate::summary::{finish, TrainOptions, TrainSummary};
use crate::telemetry::{self, StepFigures, Telemetry};

/// Trains `job` here, resuming its directory's newest checkpoint.
pub(crate) fn train(
    job: &Job,
    options: &TrainOptions,
    device: &Device,
    stop: &StopSignal,
) -> Result<TrainSummary> {
    let (engine, cfg) = (&job.engine, &job.cfg);
    let run_dir = PathBuf::from(&cfg.run.dir);
    let mut trainer = job.trainer(device)?;
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
    let telemetry = Telemetry::new();
    telemetry.run(job.total_steps, trainer.step());
    let _server = options
        .metrics_addr
        .map(|addr| telemetry::serve(addr, telemetry.clone()))
        .transpose()?;
    let mut driver = Local {
        telemetry,
        evaluated: None,
        job,
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
        job,
        &mut trainer,
        &mut cursor,
        share,
        &mut LocalReduce,
        device,
        &mut driver,
    )?;
    driver.bar.finish_and_clear();
    if let Some(previous) = driver.writing.take() {
        written(previous)?;
    }
    let keep = cfg.train.keep_checkpoints as usize;
    let writing = Instant::now();
    let dir = checkpoint::write(&run_dir, &job.checkpoint_files(&trainer, cursor)?, keep)?;
    driver.telemetry.checkpoint(writing.elapsed());
    let seconds = started.elapsed().as_secs_f64();
    let steps = trainer.step() - start_step;
    let test = if trainer.step() >= job.total_steps {
        let last = driver
            .evaluated
            .take()
            .filter(|(step, _)| *step == trainer.step())
            .map(|(_, figures)| figures);
        Some(finish(job, trainer.model(), device, last)?)
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

type Writing = JoinHandle<Result<PathBuf>>;

fn written(writing: Writing) -> Result<PathBuf> {
    writing
        .join()
        .map_err(|_| EngineError::Failed("the checkpoint writer panicked".into()))?
}

/// The single process around each step: the progress bar and metrics, checkpoints written (and
/// fsynced) on a thread of their own while training goes on, one at a time, and the stop signal
/// (SIGTERM, what Kubernetes sends before eviction, or Ctrl-C): finish the step, checkpoint,
/// return (the CLI exits 143: not finished); the same command resumes.
struct Local<'a> {
    telemetry: Arc<Telemetry>,
    /// The newest test figures and the step they were evaluated after.
    evaluated: Option<(u64, Figures)>,
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
        data: Duration,
    ) -> Result<Option<()>> {
        let cfg = &self.job.cfg;
        self.window.add(batch.rows() as u64, report.applied);
        let step = trainer.step();
        self.telemetry.step(&StepFigures::trained(
            report,
            step,
            batch.rows() as u64,
            data,
            (1, 0),
        ));
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
        if test_due(cfg, step, cursor, self.job.total_steps) {
            let figures = test_figures(trainer.model(), &self.job.test, cfg)?;
            let values = scalars(&figures);
            self.telemetry.test(&values);
            self.metrics
                .log(&test_record(step, cursor.epoch, &values))?;
            self.evaluated = Some((step, figures));
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
            let telemetry = self.telemetry.clone();
            self.writing = Some(std::thread::spawn(move || {
                let started = Instant::now();
                let written = checkpoint::write(&dir, &files, keep)?;
                telemetry.checkpoint(started.elapsed());
                Ok(written)
            }));
        }
        Ok(self.stop.raised().then_some(()))
    }
}
