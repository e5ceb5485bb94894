//! Distributed runs: `elbo coordinator` (the run's coordinator, writing the run directory) and
//! `elbo train` with `cluster.workers > 1` (a coordinator plus that many `elbo worker` child
//! processes on loopback, every child stopped on exit and on error). Like a Kubernetes
//! controller, the launcher restarts a worker that is killed (`cluster.restart_workers`); the
//! run survives the loss either way. SIGTERM or Ctrl-C stops the run at the next step boundary
//! with a checkpoint and exits 0 (a second signal stops it at once); both commands do this.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elbo_coordinator::{Aborter, CommittedStep, Coordinator, Files, RunStore, Settings, Summary};
use elbo_settings::Config;
use elbo_worker::checkpoint;
use indicatif::ProgressBar;
use rand::RngCore;
use serde_json::json;

use super::build;
use super::job::Job;
use super::layers::ConfigArgs;
use super::procs::{threads_each, Children};
use super::progress::{self, StepLine, Window};
use super::run_dir::{self, Metrics};

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where to serve workers.
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// The run's shared secret (workers must present it).
    #[arg(long, env = "ELBO_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    #[command(flatten)]
    run: super::train::RunArgs,
}

/// The run directory as the coordinator's store: metrics.jsonl, the progress bar, checkpoints.
struct RunDirStore {
    run_dir: PathBuf,
    /// Steps already taken when this run started (from the checkpoint it resumes).
    start_step: u64,
    keep: usize,
    log_every: u64,
    total_steps: u64,
    bar: ProgressBar,
    state: Mutex<StoreState>,
}

struct StoreState {
    metrics: Metrics,
    window: Window,
}

impl RunStore for RunDirStore {
    fn committed(&self, c: &CommittedStep) -> Result<(), String> {
        let mut st = self.state.lock().map_err(|e| e.to_string())?;
        st.window.add(c.rows, c.applied);
        let step = c.step + 1;
        self.bar.set_position(step);
        if step % self.log_every != 0 && step != self.total_steps {
            return Ok(());
        }
        let mut rec = st.window.record(&StepLine {
            step,
            epoch: c.epoch,
            lr: c.lr,
            grad_norm: c.grad_norm,
            terms: &c.terms,
        });
        let t = c.timings;
        rec["world"] = json!(c.world);
        rec["data_s"] = json!(t.data.as_secs_f64());
        rec["compute_s"] = json!(t.compute.as_secs_f64());
        rec["reduce_s"] = json!(t.reduce.as_secs_f64());
        rec["update_s"] = json!(t.update.as_secs_f64());
        progress::show(&self.bar, &rec, &format!("  {} workers", c.world));
        st.metrics.log(&rec).map_err(|e| format!("{e:#}"))
    }

    fn save_checkpoint(&self, step: u64, files: &Files) -> Result<(), String> {
        let state = checkpoint::decode_state(files, &checkpoint::checkpoints_dir(&self.run_dir))
            .map_err(|e| e.to_string())?;
        if state.step != step {
            return Err(format!(
                "the upload says step {step} but its state.json step {}",
                state.step
            ));
        }
        let dir = checkpoint::write(&self.run_dir, files, self.keep).map_err(|e| e.to_string())?;
        tracing::debug!(checkpoint = %dir.display(), "checkpoint saved");
        Ok(())
    }
}

/// A coordinator for the run of `cfg`, resuming its run directory's newest checkpoint.
fn coordinator(
    job: &Job,
    listen: SocketAddr,
    token: String,
    force: bool,
    max_steps: Option<u64>,
) -> anyhow::Result<(Coordinator, Arc<RunDirStore>)> {
    let cfg = &job.cfg;
    let run_dir = PathBuf::from(&cfg.run.dir);
    let (start_step, files) = match checkpoint::newest(&run_dir)? {
        Some((dir, files)) => {
            let old = build::run_config(&run_dir)?;
            run_dir::check_resume_config(&old, cfg, force)?;
            let state = checkpoint::decode_state(&files, &dir)?;
            tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
            (state.step, Some(files))
        }
        None => (0, None),
    };
    run_dir::write_config(&run_dir, cfg)?;
    let stop_step = max_steps.unwrap_or(u64::MAX).min(job.total_steps);
    if start_step >= stop_step {
        bail!(
            "{} already holds a checkpoint at step {start_step}: nothing left to train (the run has {} steps)",
            run_dir.display(),
            job.total_steps
        );
    }
    let metrics = Metrics::open(&run_dir, files.as_ref().map(|_| start_step))?;
    let c = &cfg.cluster;
    let settings = Settings {
        run_id: cfg.run.name.clone(),
        token,
        config_toml: cfg.to_toml(),
        config_sha256: run_dir::config_sha256(cfg),
        workers: c.workers,
        min_workers: c.min_workers,
        rendezvous_timeout: Duration::from_secs_f64(c.rendezvous_timeout_s),
        heartbeat_timeout: Duration::from_secs_f64(c.heartbeat_timeout_s),
        step_timeout: Duration::from_secs_f64(c.step_timeout_s),
        checksum_every: c.checksum_every,
        checkpoint_every: cfg.train.checkpoint_every,
        start_step,
        stop_step,
        checkpoint: files,
        max_message_bytes: elbo_worker::session::MAX_MESSAGE_BYTES,
    };
    let store = Arc::new(RunDirStore {
        keep: cfg.train.keep_checkpoints as usize,
        log_every: cfg.train.log_every,
        total_steps: job.total_steps,
        bar: progress::bar(job.total_steps, start_step),
        start_step,
        state: Mutex::new(StoreState {
            metrics,
            window: Window::default(),
        }),
        run_dir,
    });
    let coordinator = Coordinator::bind(listen, settings, store.clone())?;
    Ok((coordinator, store))
}

fn report(summary: &Summary, started: Instant, job: &Job, start_step: u64) {
    let secs = started.elapsed().as_secs_f64();
    let steps = summary.steps.saturating_sub(start_step);
    println!(
        "trained {steps} steps on {} workers in {secs:.1} s ({:.0} samples/s; generation {}); checkpoint at step {}",
        summary.world,
        steps as f64 * job.cfg.train.batch_size as f64 / secs.max(1e-9),
        summary.generation,
        summary.checkpoint.unwrap_or_default()
    );
    if summary.steps < job.total_steps {
        println!(
            "stopped at step {} of {}; the same command resumes the run",
            summary.steps, job.total_steps
        );
    }
}

/// `elbo coordinator`.
pub fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut cfg = args.config.load()?;
    args.run.apply(&mut cfg);
    let job = Job::prepare(cfg)?;
    let (coordinator, store) = coordinator(
        &job,
        args.listen,
        args.token,
        args.run.force,
        args.run.max_steps,
    )?;
    println!("coordinator listening on {}", coordinator.local_addr());
    on_signals(coordinator.aborter(), Arc::default())?;
    let started = Instant::now();
    let start_step = store.start_step;
    let summary = coordinator.run()?;
    store.bar.finish_and_clear();
    report(&summary, started, &job, start_step);
    Ok(())
}

/// SIGTERM or Ctrl-C: stop at the next step boundary with a checkpoint; a second one: at once.
fn on_signals(aborter: Aborter, interrupted: Arc<AtomicBool>) -> anyhow::Result<()> {
    ctrlc::set_handler(move || {
        if interrupted.swap(true, Ordering::SeqCst) {
            aborter.abort("interrupted twice (Ctrl-C or SIGTERM)");
        } else {
            aborter.drain("interrupted (Ctrl-C or SIGTERM)");
        }
    })
    .context("cannot install the Ctrl-C/SIGTERM handler")
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How often the launcher restarts one worker slot before it gives up on it.
const MAX_RESTARTS: u32 = 5;

/// The launcher's worker processes.
struct LocalWorkers<'a> {
    exe: PathBuf,
    url: String,
    token: String,
    run_id: &'a str,
    device: &'a str,
    threads: usize,
    children: Children,
    restarts: Vec<u32>,
}

impl LocalWorkers<'_> {
    /// Starts the worker of slot `slot` (its id names the restart, so a replacement never
    /// collides with its predecessor's session).
    fn spawn(&mut self, slot: usize) -> anyhow::Result<()> {
        let id = match self.restarts[slot] {
            0 => format!("worker-{slot}"),
            n => format!("worker-{slot}-r{n}"),
        };
        let child = Command::new(&self.exe)
            .args([
                "worker",
                "--coordinator",
                &self.url,
                "--run-id",
                self.run_id,
            ])
            .args(["--worker-id", &id, "--device", self.device])
            .args(["--listen", "127.0.0.1:0", "--exit-with-parent"])
            .env("ELBO_TOKEN", &self.token)
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            .env(
                "ELBO_LOG",
                std::env::var("ELBO_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        if slot < self.children.0.len() {
            self.children.0[slot] = (id, child);
        } else {
            self.children.0.push((id, child));
        }
        Ok(())
    }

    /// Checks on the children: one killed by a signal is restarted (when `restart`); one that
    /// exits with an error fails the run (it has said why to the coordinator, which stops it).
    fn watch(&mut self, restart: bool, aborter: &Aborter) -> anyhow::Result<()> {
        for slot in 0..self.children.0.len() {
            let (id, child) = &mut self.children.0[slot];
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let id = id.clone();
            if status.success() || self.restarts[slot] == u32::MAX {
                continue;
            }
            let killed = status.code().is_none();
            if killed && restart && self.restarts[slot] < MAX_RESTARTS {
                self.restarts[slot] += 1;
                tracing::warn!(worker = %id, %status, "worker died; starting a replacement");
                self.spawn(slot)?;
            } else if killed {
                tracing::warn!(worker = %id, %status, "worker died; the run goes on without it");
                self.restarts[slot] = u32::MAX;
            } else {
                aborter.abort(&format!("{id} exited ({status})"));
                self.restarts[slot] = u32::MAX;
            }
        }
        Ok(())
    }
}

/// `elbo train` with `cluster.workers > 1`: a coordinator here, the workers as child processes.
pub fn train(cfg: Config, device: &str, force: bool, max_steps: Option<u64>) -> anyhow::Result<()> {
    let device_handle = build::device(device)?;
    let job = Job::prepare(cfg)?;
    let token = random_token();
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let (coordinator, store) = coordinator(&job, loopback, token.clone(), force, max_steps)?;
    let url = format!("http://{}", coordinator.local_addr());
    let aborter = coordinator.aborter();
    on_signals(aborter.clone(), Arc::default())?;
    let workers = job.cfg.cluster.workers;
    let mut local = LocalWorkers {
        exe: std::env::current_exe().context("cannot find the elbo executable")?,
        url: url.clone(),
        token,
        run_id: &job.cfg.run.name,
        device,
        threads: threads_each(workers),
        children: Children::default(),
        restarts: vec![0; workers as usize],
    };
    for slot in 0..workers as usize {
        local.spawn(slot)?;
    }
    tracing::info!(workers, %url, run_dir = %job.cfg.run.dir, "training with local workers");
    let start_step = store.start_step;
    let started = Instant::now();
    let running = std::thread::spawn(move || coordinator.run());
    while !running.is_finished() {
        local.watch(job.cfg.cluster.restart_workers, &aborter)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcome = running
        .join()
        .map_err(|_| anyhow::anyhow!("the coordinator thread panicked"))?;
    store.bar.finish_and_clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, child) in &mut local.children.0 {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(local);
    let summary = outcome?;
    report(&summary, started, &job, start_step);
    if summary.steps >= job.total_steps {
        let run_dir = Path::new(&job.cfg.run.dir);
        let (_, model, test) = super::train::load_model(run_dir, &device_handle)?;
        super::train::finish(&model, &test, &job.cfg, run_dir, &device_handle)?;
    }
    Ok(())
}
