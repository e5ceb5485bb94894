//! `elbo train`: one process trains the configured model, resumably.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use elbo_datasets::sprites::Split;
use elbo_datasets::{BatchStream, Cursor, Dataset};
use elbo_models::{Model, Vae};
use elbo_settings::Config;
use elbo_worker::checkpoint;
use elbo_worker::LocalReduce;

use super::build;
use super::job::{restore, Job};
use super::layers::ConfigArgs;
use super::pictures::{self, ImageShape};
use super::progress::{self, StepLine, Window};
use super::run_dir::{self, Metrics};

/// Where a run lives and how far it goes (shared by `elbo train` and `elbo coordinator`).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run directory (overrides run.dir); a directory holding a checkpoint is resumed.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Resume even if the config differs from the one the checkpoint was written with.
    #[arg(long)]
    pub force: bool,
    /// Stop after this many global steps (with a checkpoint); the run resumes from there.
    #[arg(long)]
    pub max_steps: Option<u64>,
}

impl RunArgs {
    /// Applies `--run-dir` to the config.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(dir) = &self.run_dir {
            cfg.run.dir = dir.to_string_lossy().into_owned();
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut cfg = args.config.load()?;
    args.run.apply(&mut cfg);
    let device = build::device(&args.device)?;
    let run_dir = PathBuf::from(&cfg.run.dir);
    if cfg.cluster.workers > 1 {
        return super::launch::train(cfg, &args.device, args.run.force, args.run.max_steps);
    }
    let job = Job::prepare(cfg)?;
    let (cfg, train, test, plan, total_steps) =
        (&job.cfg, &job.train, &job.test, &job.plan, job.total_steps);
    let mut trainer = job.trainer(&device)?;

    let mut cursor = Cursor::start(0);
    let newest = checkpoint::newest(&run_dir)?;
    if let Some((dir, files)) = &newest {
        let old = build::run_config(&run_dir)?;
        run_dir::check_resume_config(&old, cfg, args.run.force)?;
        let ck = checkpoint::decode(files, trainer.layout(), dir)?;
        cursor = restore(&mut trainer, ck)?;
        tracing::info!(checkpoint = %dir.display(), step = trainer.step(), "resuming");
    }
    run_dir::write_config(&run_dir, cfg)?;
    let mut metrics = Metrics::open(&run_dir, newest.as_ref().map(|_| trainer.step()))?;
    let stop_at = args.run.max_steps.unwrap_or(u64::MAX).min(total_steps);
    let keep = cfg.train.keep_checkpoints as usize;
    // Periodic checkpoints are written (and fsynced) on a thread of their own while training
    // goes on, one at a time; the final one is written before the run reports.
    let mut writing: Option<std::thread::JoinHandle<anyhow::Result<PathBuf>>> = None;
    let written = |w: std::thread::JoinHandle<anyhow::Result<PathBuf>>| -> anyhow::Result<PathBuf> {
        w.join()
            .map_err(|_| anyhow::anyhow!("the checkpoint writer panicked"))?
    };

    tracing::info!(run_dir = %run_dir.display(), rows = train.rows(), steps = total_steps, params = trainer.layout().len(), "training");
    let bar = progress::bar(total_steps, trainer.step());
    let mut window = Window::default();
    let started = Instant::now();
    let start_step = trainer.step();
    let decode_threads = 1;
    // SIGTERM (what Kubernetes sends before eviction) or Ctrl-C: finish the step, checkpoint,
    // exit 0; the same command resumes.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        ctrlc::set_handler(move || interrupted.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C/SIGTERM handler")?;
    }
    'epochs: while cursor.epoch < cfg.train.epochs && trainer.step() < stop_at {
        let stream = BatchStream::new(
            train.clone(),
            plan.rank_plan(cursor, 1, 0)?,
            build::binarizer(cfg),
            decode_threads,
        );
        for batch in stream {
            let batch = batch?;
            let report = trainer.train_step(&batch, &mut LocalReduce, &device)?;
            cursor = batch.cursor_after;
            window.add(batch.rows() as u64, report.applied);
            let step = trainer.step();
            if step % cfg.train.log_every == 0 || step == total_steps {
                let rec = window.record(&StepLine {
                    step,
                    epoch: cursor.epoch,
                    lr: report.lr,
                    grad_norm: report.grad_norm,
                    terms: &report.terms,
                });
                progress::show(&bar, &rec, "");
                metrics.log(&rec)?;
            }
            bar.set_position(step);
            if cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0 {
                if let Some(previous) = writing.take() {
                    written(previous)?;
                }
                let files = job.checkpoint_files(&trainer, job.normalise(cursor))?;
                let (dir, keep) = (run_dir.clone(), keep);
                writing = Some(std::thread::spawn(move || {
                    Ok(checkpoint::write(&dir, &files, keep)?)
                }));
            }
            if step >= stop_at || interrupted.load(Ordering::SeqCst) {
                break 'epochs;
            }
        }
        cursor = job.normalise(cursor);
    }
    bar.finish_and_clear();
    let cursor = job.normalise(cursor);
    if let Some(previous) = writing.take() {
        written(previous)?;
    }
    let dir = checkpoint::write(&run_dir, &job.checkpoint_files(&trainer, cursor)?, keep)?;
    let steps = trainer.step() - start_step;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "trained {steps} steps in {secs:.1} s ({:.0} samples/s); checkpoint {}",
        steps as f64 * cfg.train.batch_size as f64 / secs.max(1e-9),
        dir.display()
    );
    if trainer.step() >= total_steps {
        let vae = trainer.model();
        finish(vae, test, cfg, &run_dir, &device)?;
    } else if interrupted.load(Ordering::SeqCst) {
        println!(
            "interrupted at step {} of {total_steps}; the same command resumes the run",
            trainer.step()
        );
    }
    Ok(())
}

/// The end of a finished run: the test −ELBO and the pictures.
pub fn finish(
    model: &dyn Model,
    test: &std::sync::Arc<Dataset>,
    cfg: &Config,
    run_dir: &Path,
    device: &Device,
) -> anyhow::Result<()> {
    let neg_elbo = super::eval::evaluate(model, test, cfg, device, None)?.neg_elbo;
    println!("test −ELBO {neg_elbo:.3} nats (single sample; `elbo eval` gives the IW bound)");
    write_pictures(model, test, cfg, run_dir, device)
}

/// samples.png, reconstructions.png, traversals.png and loss.png under `run_dir/samples/`.
pub fn write_pictures(
    model: &dyn Model,
    test: &std::sync::Arc<Dataset>,
    cfg: &Config,
    run_dir: &Path,
    device: &Device,
) -> anyhow::Result<()> {
    let shape = match ImageShape::of(&test.schema().shape) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no pictures: {e}");
            return Ok(());
        }
    };
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    pictures::grid(
        &pictures::samples(model, 64, cfg.run.seed, device)?,
        shape,
        8,
        &dir.join("samples.png"),
    )?;
    let plan = test.plan(cfg.run.seed, 32, 32, false)?;
    let first = BatchStream::new(test.clone(), plan.plan(0, 1, 0)?, build::binarizer(cfg), 0)
        .next()
        .context("the test set is empty")??;
    let x = Tensor::from_slice(&first.x, (first.rows(), first.dim), device)?;
    let rec = pictures::reconstructions(model, &x, &first.ids, 8)?;
    pictures::grid(&rec, shape, 8, &dir.join("reconstructions.png"))?;
    let one = x.narrow(0, 0, 1)?;
    let trav = pictures::traversals(model, &one, first.ids[0], 10, 9)?;
    pictures::grid(&trav, shape, 9, &dir.join("traversals.png"))?;
    pictures::curve(&Metrics::series(run_dir, "neg_elbo"), &dir.join("loss.png"))?;
    Ok(())
}

/// Loads the newest checkpoint of a run into a fresh model of its config.
pub fn load_model(
    run_dir: &Path,
    device: &Device,
) -> anyhow::Result<(Config, Vae, std::sync::Arc<Dataset>)> {
    let cfg = build::run_config(run_dir)?;
    let test = build::dataset(&cfg, Split::Test)?;
    let model = build::model(&cfg, test.schema(), device)?;
    let layout = elbo_worker::FlatLayout::new(elbo_models::Model::params(&model).vars());
    let (newest, files) = checkpoint::newest(run_dir)?
        .with_context(|| format!("{} has no checkpoint yet", run_dir.display()))?;
    let ck = checkpoint::decode(&files, &layout, &newest)?;
    layout.write_params(&ck.params)?;
    Ok((cfg, model, test))
}
