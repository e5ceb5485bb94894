//! `elbo train`, `elbo coordinator` and `elbo worker`: their flags, the signal handler, and
//! what they print. The runs themselves are the engine's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use elbo_engine::launch::CoordinatorOptions;
use elbo_engine::worker::WorkerOptions;
use elbo_engine::{Engine, StopSignal, TrainOptions, TrainSummary};
use elbo_models::{Metric, Metrics};

use super::args::{ConfigArgs, MetricsArgs, RunArgs, TlsArgs};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Worker processes on this machine (`cluster.workers`; 1 trains in this process).
    #[arg(long, value_name = "N")]
    workers: Option<u32>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

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
    run: RunArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's URL, e.g. http://10.0.0.5:50051 (https:// with TLS).
    #[arg(long, env = "ELBO_COORDINATOR")]
    coordinator: String,
    /// The run id the coordinator serves (its run.name).
    #[arg(long, env = "ELBO_RUN_ID")]
    run_id: String,
    /// The run's shared secret.
    #[arg(long, env = "ELBO_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// This worker's id, unique in the run (default: host name and process id).
    #[arg(long, env = "ELBO_WORKER_ID")]
    worker_id: Option<String>,
    /// Where to serve the ring (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The address peers reach this worker at (needed when `--listen` is `0.0.0.0` or `[::]`).
    #[arg(long, env = "ELBO_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// This worker's own config: the coordinator refuses the worker if it differs from the run's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up if the coordinator cannot be reached for this many seconds.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout_s: f64,
    /// Append `generation step row-id` for every row this worker trains on to this file, or to
    /// DIR/WORKER_ID if it is a directory (a data audit; a step redone in a later generation
    /// appears again there, under the later generation).
    #[arg(long, env = "ELBO_AUDIT_ROWS")]
    audit_rows: Option<PathBuf>,
    /// Sleep this long before each step (fault-injection tests and demos: a run slow enough to
    /// interrupt at a chosen step).
    #[arg(
        long,
        env = "ELBO_WORKER_THROTTLE_MS",
        hide = true,
        default_value_t = 0
    )]
    throttle_ms: u64,
    /// Exit when the parent process dies (set by `elbo train` for its local workers, so none
    /// outlives a launcher that was killed outright).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// SIGTERM (what Kubernetes sends before eviction) or Ctrl-C: the run stops at the next step
/// boundary with a checkpoint and exits 143 (not finished); a second one stops it at once.
fn on_signals() -> anyhow::Result<StopSignal> {
    let stop = StopSignal::default();
    let raise = stop.clone();
    ctrlc::set_handler(move || raise.raise())
        .context("cannot install the Ctrl-C/SIGTERM handler")?;
    Ok(stop)
}

fn executable() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the elbo executable")
}

pub fn train(engine: &Engine, mut args: TrainArgs) -> anyhow::Result<()> {
    if let Some(n) = args.workers {
        let set = |s: &String| s.split('=').next().map(str::trim) == Some("cluster.workers");
        if args.config.set.iter().any(set) {
            bad!("--workers {n} and --set cluster.workers=…: give the number of workers once");
        }
        args.config.set.push(format!("cluster.workers={n}"));
    }
    let cfg = args.run.apply(args.config.load(engine)?);
    let options = TrainOptions {
        device: args.device,
        force: args.run.force,
        max_steps: args.run.max_steps,
        exe: executable()?,
        metrics_addr: args.metrics.metrics_addr,
    };
    let summary = elbo_engine::train(engine, cfg, &options, &on_signals()?)?;
    report(&summary);
    unfinished(&summary)
}

pub fn coordinator(engine: &Engine, args: CoordinatorArgs) -> anyhow::Result<()> {
    let cfg = args.run.apply(args.config.load(engine)?);
    let options = CoordinatorOptions {
        listen: args.listen,
        token: args.token,
        force: args.run.force,
        max_steps: args.run.max_steps,
        metrics_addr: args.metrics.metrics_addr,
    };
    let summary = elbo_engine::launch::serve(engine, cfg, &options, &on_signals()?, |addr| {
        println!("coordinator listening on {addr}")
    })?;
    report(&summary);
    unfinished(&summary)
}

pub fn worker(engine: &Engine, args: WorkerArgs) -> anyhow::Result<()> {
    if !(args.connect_timeout_s.is_finite() && args.connect_timeout_s > 0.0) {
        bad!(
            "--connect-timeout-s {}: expected a positive number of seconds",
            args.connect_timeout_s
        );
    }
    if args.throttle_ms > 60_000 {
        bad!("--throttle-ms {}: expected at most 60000", args.throttle_ms);
    }
    if args.exit_with_parent {
        exit_with_parent();
    }
    let options = WorkerOptions {
        coordinator: args.coordinator,
        run_id: args.run_id,
        token: args.token,
        worker_id: args.worker_id.unwrap_or_else(default_worker_id),
        listen: args.listen,
        advertise: args.advertise,
        device: args.device,
        config: args.config,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout_s),
        audit_rows: args.audit_rows,
        throttle: Duration::from_millis(args.throttle_ms),
        metrics_addr: args.metrics.metrics_addr,
        tls: args.tls.settings(),
    };
    Ok(elbo_engine::worker::run(engine, &options)?)
}

/// Exits the process once its parent is gone (it is re-parented).
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("elbo worker: the launcher is gone; exiting");
            std::process::exit(1);
        }
    });
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// A run a signal stopped before its end is not done: [`super::Interrupted`] (exit 143).
fn unfinished(s: &TrainSummary) -> anyhow::Result<()> {
    if s.interrupted && s.step < s.total_steps {
        return Err(super::Interrupted.into());
    }
    Ok(())
}

/// What a training run did, in a few lines.
fn report(s: &TrainSummary) {
    match s.generation {
        None => println!(
            "trained {} steps in {:.1} s ({:.0} samples/s); checkpoint {}",
            s.steps,
            s.seconds,
            s.samples_per_s,
            s.checkpoint.display()
        ),
        Some(generation) => println!(
            "trained {} steps on {} workers in {:.1} s ({:.0} samples/s; generation {generation}); checkpoint at step {}",
            s.steps,
            s.world,
            s.seconds,
            s.samples_per_s,
            s.checkpoint_step
        ),
    }
    if let Some(test) = &s.test {
        println!("{}", test_line(test));
    } else if s.step < s.total_steps {
        let why = if s.interrupted {
            "interrupted"
        } else {
            "stopped"
        };
        println!(
            "{why} at step {} of {}; the same command resumes the run",
            s.step, s.total_steps
        );
    }
}

/// The test figures of a finished run: −ELBO where the model has one, else every figure.
fn test_line(figures: &Metrics) -> String {
    if let Some(Metric::Value(neg_elbo)) = figures.get("neg_elbo") {
        return format!(
            "test −ELBO {neg_elbo:.3} nats (single sample; `elbo eval` gives the IW bound)"
        );
    }
    let parts: Vec<String> = figures
        .iter()
        .map(|(k, v)| format!("{k} {}", serde_json::to_string(v).unwrap_or_default()))
        .collect();
    format!("test {}", parts.join(", "))
}
