//! Distributed runs: `elbo coordinator` (the run's coordinator, writing the run directory) and
//! `elbo train` with `cluster.workers > 1` (a coordinator plus that many `elbo worker` child
//! processes on loopback, every child stopped on exit and on error). Like a Kubernetes
//! controller, the launcher restarts a worker that is killed (`cluster.restart_workers`); the
//! run survives the loss either way. SIGTERM or Ctrl-C stops the run at the next step boundary
//! with a checkpoint (the CLI then exits 143: not finished; a second signal stops it at once);
//! both commands do this.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use elbo_coordinator::{Aborter, CommittedStep, Coordinator, Files, RunStore, Settings};
use elbo_settings::{Config, TlsConfig};
use elbo_worker::checkpoint;
use indicatif::ProgressBar;
use rand::RngCore;
use serde_json::json;

use crate::build::Engine;
use crate::error::{io, EngineError, Result};
use crate::eval::test_record;
use crate::job::Job;
use crate::procs::{threads_each, Children};
use crate::progress::{self, StepLine, Window};
use crate::run_dir::{self, Metrics};
use crate::signal::StopSignal;
use crate::summary::{finish, TrainOptions, TrainSummary};
use crate::telemetry::{self, MetricsServer, StepFigures, Telemetry};

/// How to run `elbo coordinator`.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Where to serve workers.
    pub listen: SocketAddr,
    /// The run's shared secret (workers must present it).
    pub token: String,
    /// Resume even if the config differs from the checkpoint's.
    pub force: bool,
    /// Stop after this many global steps (with a checkpoint).
    pub max_steps: Option<u64>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_addr: Option<SocketAddr>,
}

/// The run directory as the coordinator's store: metrics.jsonl, the progress bar, checkpoints.
struct RunDirStore {
    telemetry: Arc<Telemetry>,
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

impl RunDirStore {
    /// Logs a committed step's record (and shows it).
    fn log_step(&self, st: &mut StoreState, c: &CommittedStep, step: u64) -> Result<(), String> {
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
        st.metrics.log(&rec).map_err(|e| e.to_string())
    }
}

impl RunStore for RunDirStore {
    fn committed(&self, c: &CommittedStep) -> Result<(), String> {
        let mut st = self.state.lock().map_err(|e| e.to_string())?;
        st.window.add(c.rows, c.applied);
        let step = c.step + 1;
        self.bar.set_position(step);
        let t = c.timings;
        self.telemetry.step(&StepFigures {
            step,
            rows: c.rows,
            applied: c.applied,
            terms: &c.terms,
            grad_norm: c.grad_norm,
            lr: c.lr,
            world: c.world,
            generation: c.generation,
            parts: [t.data, t.compute, t.reduce, t.update],
        });
        if step % self.log_every == 0 || step == self.total_steps {
            self.log_step(&mut st, c, step)?;
        }
        if !c.test.is_empty() {
            self.telemetry.test(&c.test);
            let rec = test_record(step, c.epoch, &c.test);
            st.metrics.log(&rec).map_err(|e| e.to_string())?;
        }
        Ok(())
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
        let started = Instant::now();
        let dir = checkpoint::write(&self.run_dir, files, self.keep).map_err(|e| e.to_string())?;
        self.telemetry.checkpoint(started.elapsed());
        tracing::debug!(checkpoint = %dir.display(), "checkpoint saved");
        Ok(())
    }
}

/// A coordinator for the run of `job`, resuming its run directory's newest checkpoint.
fn coordinator(
    job: &Job,
    listen: SocketAddr,
    token: String,
    force: bool,
    max_steps: Option<u64>,
    metrics_addr: Option<SocketAddr>,
) -> Result<(Coordinator, Arc<RunDirStore>, Option<MetricsServer>)> {
    let cfg = &job.cfg;
    let tls = crate::tls::load(&cfg.cluster.tls, crate::tls::CONFIG_KEYS)?;
    let run_dir = PathBuf::from(&cfg.run.dir);
    let (start_step, files) = match checkpoint::newest(&run_dir)? {
        Some((dir, files)) => {
            let old = job.engine.run_config(&run_dir)?;
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
        return Err(EngineError::Invalid(format!(
            "{} already holds a checkpoint at step {start_step}: nothing left to train (the run has {} steps)",
            run_dir.display(),
            job.total_steps
        )));
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
        tls,
    };
    let telemetry = Telemetry::new();
    telemetry.run(job.total_steps, start_step);
    let server = metrics_addr
        .map(|addr| telemetry::serve(addr, telemetry.clone()))
        .transpose()?;
    let store = Arc::new(RunDirStore {
        telemetry,
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
    Ok((coordinator, store, server))
}

/// `elbo coordinator`: serves the run of `cfg` until it ends.
pub fn serve(
    engine: &Engine,
    cfg: Config,
    options: &CoordinatorOptions,
    stop: &StopSignal,
    listening: impl FnOnce(SocketAddr),
) -> Result<TrainSummary> {
    let job = Job::prepare(engine, cfg)?;
    let (coordinator, store, _server) = coordinator(
        &job,
        options.listen,
        options.token.clone(),
        options.force,
        options.max_steps,
        options.metrics_addr,
    )?;
    listening(coordinator.local_addr());
    stop.attach(coordinator.aborter());
    let started = Instant::now();
    let summary = coordinator.run();
    store.bar.finish_and_clear();
    summarise(summary?, started, &job, store.start_step, stop)
}

fn summarise(
    summary: elbo_coordinator::Summary,
    started: Instant,
    job: &Job,
    start_step: u64,
    stop: &StopSignal,
) -> Result<TrainSummary> {
    let seconds = started.elapsed().as_secs_f64();
    let steps = summary.steps.saturating_sub(start_step);
    let checkpoint = summary.checkpoint.unwrap_or_default();
    Ok(TrainSummary {
        steps,
        seconds,
        samples_per_s: steps as f64 * job.cfg.train.batch_size as f64 / seconds.max(1e-9),
        world: summary.world,
        generation: Some(summary.generation),
        step: summary.steps,
        total_steps: job.total_steps,
        checkpoint: checkpoint::step_dir(Path::new(&job.cfg.run.dir), checkpoint),
        checkpoint_step: checkpoint,
        interrupted: stop.raised(),
        test: None,
    })
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
    tls: &'a TlsConfig,
    run_id: &'a str,
    device: &'a str,
    threads: usize,
    children: Children,
    restarts: Vec<u32>,
}

impl LocalWorkers<'_> {
    /// Starts the worker of slot `slot` (its id names the restart, so a replacement never
    /// collides with its predecessor's session).
    fn spawn(&mut self, slot: usize) -> Result<()> {
        let id = match self.restarts[slot] {
            0 => format!("worker-{slot}"),
            n => format!("worker-{slot}-r{n}"),
        };
        let mut command = Command::new(&self.exe);
        if self.tls.enabled() {
            command
                .env("ELBO_TLS_CERT", &self.tls.cert)
                .env("ELBO_TLS_KEY", &self.tls.key)
                .env("ELBO_TLS_CA", &self.tls.ca)
                .env("ELBO_TLS_MUTUAL", self.tls.mutual.to_string())
                .env("ELBO_TLS_SERVER_NAME", &self.tls.server_name);
        }
        let child = command
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
            .map_err(io(format!("cannot start {}", self.exe.display())))?;
        if slot < self.children.0.len() {
            self.children.0[slot] = (id, child);
        } else {
            self.children.0.push((id, child));
        }
        Ok(())
    }

    /// Checks on the children: one killed by a signal is restarted (when `restart`); one that
    /// exits with an error fails the run (it has said why to the coordinator, which stops it).
    fn watch(&mut self, restart: bool, aborter: &Aborter) -> Result<()> {
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
pub(crate) fn train(
    job: &Job,
    options: &TrainOptions,
    device: &Device,
    stop: &StopSignal,
) -> Result<TrainSummary> {
    let token = random_token();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (coordinator, store, _server) = coordinator(
        job,
        loopback,
        token.clone(),
        options.force,
        options.max_steps,
        options.metrics_addr,
    )?;
    let tls = &job.cfg.cluster.tls;
    let scheme = if tls.enabled() { "https" } else { "http" };
    let url = format!("{scheme}://{}", coordinator.local_addr());
    let aborter = coordinator.aborter();
    stop.attach(aborter.clone());
    let workers = job.cfg.cluster.workers;
    let mut local = LocalWorkers {
        exe: options.exe.clone(),
        url: url.clone(),
        token,
        tls,
        run_id: &job.cfg.run.name,
        device: &options.device,
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
        .map_err(|_| EngineError::Failed("the coordinator thread panicked".into()))?;
    store.bar.finish_and_clear();
    // Workers leave by themselves when the run ends; stopped by a signal, they would wait for
    // the coordinator to come back (what a Kubernetes replacement does), so they are stopped.
    let wait = if stop.raised() { 0 } else { 10 };
    let deadline = Instant::now() + Duration::from_secs(wait);
    for (_, child) in &mut local.children.0 {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(local);
    let mut summary = summarise(outcome?, started, job, start_step, stop)?;
    if summary.step >= job.total_steps {
        let run = crate::eval::load_run(&job.engine, Path::new(&job.cfg.run.dir), device)?;
        summary.test = Some(finish(job, run.model.as_ref(), device, None)?);
    }
    Ok(summary)
}
