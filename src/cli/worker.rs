//! `elbo worker`: joins a coordinator's run, trains its share of every global batch, takes part
//! in the ring all-reduce, reports each step, and (as rank 0) hands checkpoints over.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elbo_datasets::{BatchStream, Cursor};
use elbo_worker::checkpoint;
use elbo_worker::grpc_ring::BoundPeer;
use elbo_worker::ring::RingAllReduce;
use elbo_worker::session::{self, Command, JoinRequest, Report, Session, StartCommand};
use elbo_worker::Trainer;

use super::build;
use super::job::{restore, Job};
use super::run_dir;

/// The largest ring chunk any config allows (cluster.ring_chunk_kib ≤ 16 MiB), in f32s.
const MAX_CHUNK_VALUES: usize = (16 << 20) / 4;

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's URL, e.g. http://10.0.0.5:50051.
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
    /// The address peers reach this worker at (needed when --listen is 0.0.0.0 or [::]).
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
    /// Append the id of every row this worker trains on to this file (a data audit).
    #[arg(long)]
    audit_rows: Option<PathBuf>,
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

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if !(args.connect_timeout_s.is_finite() && args.connect_timeout_s > 0.0) {
        bail!(
            "--connect-timeout-s {}: expected a positive number of seconds",
            args.connect_timeout_s
        );
    }
    let device = build::device(&args.device)?;
    let mut audit = match &args.audit_rows {
        Some(path) => Some(BufWriter::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --audit-rows {}", path.display()))?,
        )),
        None => None,
    };
    let peer = BoundPeer::bind(args.listen, MAX_CHUNK_VALUES)?;
    let advertise = match args.advertise {
        Some(a) => a,
        None if args.listen.ip().is_unspecified() => bail!(
            "--listen {} does not say where peers reach this worker: pass --advertise IP:PORT",
            args.listen
        ),
        None => peer.local_addr(),
    };
    let own_config = match &args.config {
        Some(path) => {
            let layers = elbo_settings::Layers {
                file: Some(path.clone()),
                ..Default::default()
            };
            let cfg = elbo_settings::load(&layers)
                .with_context(|| format!("cannot read --config {}", path.display()))?;
            Some(run_dir::config_sha256(&cfg))
        }
        None => None,
    };
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let request = JoinRequest {
        run_id: args.run_id.clone(),
        token: args.token.clone(),
        config_sha256: own_config,
        worker_id: worker_id.clone(),
        peer_address: advertise,
        device: args.device.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.connect_timeout_s);
    let session = Session::join(&args.coordinator, request, deadline, peer.runtime())?;
    let label = PathBuf::from(format!("<config from {}>", args.coordinator));
    let cfg = elbo_settings::load_toml(session.config_toml(), &label)?;
    if run_dir::config_sha256(&cfg) != session.config_sha256() {
        bail!("the config received from the coordinator does not match its SHA-256");
    }
    tracing::info!(worker = %worker_id, peer = %advertise, "joined the run");
    let job = Job::prepare(cfg)?;
    let mut trainer = job.trainer(&device)?;
    let rendezvous = Duration::from_secs_f64(job.cfg.cluster.rendezvous_timeout_s + 30.0);
    let start = match session.next_command(rendezvous)? {
        Command::Start(start) => start,
        Command::Stop { reason, failed } => return stopped(&reason, failed),
    };
    train(
        &job,
        &mut trainer,
        &peer,
        &session,
        &start,
        &device,
        audit.as_mut(),
    )?;
    if let Some(audit) = audit.as_mut() {
        audit.flush().context("cannot write --audit-rows")?;
    }
    match session.next_command(Duration::from_secs(120))? {
        Command::Stop { reason, failed } => stopped(&reason, failed),
        Command::Start(_) => bail!("the coordinator restarted a finished worker"),
    }
}

fn stopped(reason: &str, failed: bool) -> anyhow::Result<()> {
    if failed {
        bail!("the coordinator stopped the run: {reason}");
    }
    tracing::info!(reason, "stopped");
    Ok(())
}

/// Trains from the command's starting point to its stop step.
fn train(
    job: &Job,
    trainer: &mut Trainer,
    peer: &BoundPeer,
    session: &Session,
    start: &StartCommand,
    device: &candle_core::Device,
    mut audit: Option<&mut BufWriter<File>>,
) -> anyhow::Result<()> {
    let cfg = &job.cfg;
    let mut cursor = Cursor::start(0);
    if let Some(files) = &start.checkpoint {
        let origin = Path::new("<checkpoint from the coordinator>");
        cursor = restore(
            trainer,
            checkpoint::decode(files, trainer.layout(), origin)?,
        )?;
    }
    let (rank, world) = (start.rank as usize, start.world as usize);
    let step_timeout = Duration::from_secs_f64(cfg.cluster.step_timeout_s);
    let next = start.peers[(rank + 1) % world];
    let connected = peer.connect(
        start.generation,
        rank,
        world,
        next,
        Instant::now() + step_timeout,
        session.stopped_flag(),
    );
    let ring = match connected {
        Ok(ring) => ring,
        Err(e) => match session.poll_command()? {
            Some(Command::Stop { reason, failed }) => return stopped(&reason, failed),
            _ => return Err(e.into()),
        },
    };
    let chunk_values = (cfg.cluster.ring_chunk_kib as usize * 1024 / 4).max(1);
    let mut reduce = RingAllReduce::new(ring, start.generation, chunk_values, step_timeout)?;
    let upload = |trainer: &Trainer, cursor: Cursor| -> anyhow::Result<()> {
        let files = job.checkpoint_files(trainer, cursor)?;
        Ok(session.upload_checkpoint(start.generation, trainer.step(), files)?)
    };
    let every = |n: u64, step: u64| n > 0 && step % n == 0;
    'epochs: while cursor.epoch < cfg.train.epochs && trainer.step() < start.stop_step {
        let plan = job.plan.rank_plan(cursor, start.world, start.rank)?;
        let mut stream = BatchStream::new(job.train.clone(), plan, build::binarizer(cfg), 1);
        loop {
            let waited = Instant::now();
            let Some(batch) = stream.next() else { break };
            let batch = batch?;
            let data = waited.elapsed();
            if let Some(Command::Stop { reason, failed }) = session.poll_command()? {
                return stopped(&reason, failed);
            }
            if let Some(audit) = audit.as_deref_mut() {
                for id in &batch.ids {
                    writeln!(audit, "{id}").context("cannot write --audit-rows")?;
                }
            }
            let report = match trainer.train_step(&batch, &mut reduce, device) {
                Ok(report) => report,
                Err(e) => match session.poll_command()? {
                    Some(Command::Stop { reason, failed }) => return stopped(&reason, failed),
                    _ => return Err(e.into()),
                },
            };
            cursor = job.normalise(batch.cursor_after);
            let step = trainer.step();
            let checksum =
                every(start.checksum_every, step).then(|| session::checksum(trainer.params()));
            session.report(&Report {
                generation: start.generation,
                step: &report,
                rows: batch.rows() as u64,
                data,
                checksum,
                cursor: (cursor.epoch, cursor.step),
            })?;
            let last = step >= start.stop_step;
            if rank == 0 && (last || every(start.checkpoint_every, step)) {
                upload(trainer, cursor)?;
            }
            if last {
                break 'epochs;
            }
        }
        cursor = job.normalise(cursor);
    }
    Ok(())
}
