//! `elbo worker`: joins a coordinator's run, trains its share of every global batch, takes part
//! in the ring all-reduce, reports each step, and (as rank 0) hands checkpoints over. It lives
//! through generations: when the ring breaks or the coordinator halts it, it stops at a step
//! boundary, says where it stands, hands its state over when asked, and trains on in the next
//! generation; when the coordinator is lost it reconnects with backoff
//! (`cluster.reconnect_timeout_s`) and goes on from whatever state the coordinator gives it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elbo_datasets::{BatchStream, Cursor};
use elbo_worker::checkpoint;
use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce};
use elbo_worker::ring::RingSettings;
use elbo_worker::session::{self, Command, JoinRequest, Report, Session, StartCommand, Upload};
use elbo_worker::{Trainer, WorkerError};

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

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if !(args.connect_timeout_s.is_finite() && args.connect_timeout_s > 0.0) {
        bail!(
            "--connect-timeout-s {}: expected a positive number of seconds",
            args.connect_timeout_s
        );
    }
    if args.throttle_ms > 60_000 {
        bail!("--throttle-ms {}: expected at most 60000", args.throttle_ms);
    }
    if args.exit_with_parent {
        exit_with_parent();
    }
    let device = build::device(&args.device)?;
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !(1..=253).contains(&worker_id.len())
        || !worker_id.chars().all(plain)
        || worker_id.starts_with('.')
    {
        bail!("--worker-id {worker_id:?}: expected 1–253 characters of A–Z, a–z, 0–9, '-', '_', '.' (not starting with '.')");
    }
    let audit = match &args.audit_rows {
        Some(dir) if dir.is_dir() => Some(dir.join(&worker_id)),
        other => other.clone(),
    };
    let audit = match &audit {
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
    let request = JoinRequest {
        run_id: args.run_id.clone(),
        token: args.token.clone(),
        config_sha256: own_config,
        worker_id: worker_id.clone(),
        peer_address: advertise,
        device: args.device.clone(),
        last_generation: 0,
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.connect_timeout_s);
    let session = Session::join(
        &args.coordinator,
        request.clone(),
        deadline,
        peer.runtime(),
        false,
    )?;
    let label = PathBuf::from(format!("<config from {}>", args.coordinator));
    let cfg = elbo_settings::load_toml(session.config_toml(), &label)?;
    if run_dir::config_sha256(&cfg) != session.config_sha256() {
        bail!("the config received from the coordinator does not match its SHA-256");
    }
    tracing::info!(worker = %worker_id, peer = %advertise, "joined the run");
    let job = Job::prepare(cfg)?;
    let trainer = job.trainer(&device)?;
    let mut worker = Worker {
        job,
        trainer,
        cursor: Cursor::start(0),
        generation: 0,
        halted: None,
        device,
        audit,
        throttle: Duration::from_millis(args.throttle_ms),
    };
    let mut session = session;
    loop {
        let outcome = worker.serve(&session, &peer);
        let lost = match outcome {
            Ok(Served::Stopped { reason, failed }) => return stopped(&reason, failed),
            Err(Failure::Coordinator(e)) => e,
            Err(Failure::Fatal(e)) => {
                session.fail(&format!("{e:#}"));
                return Err(e);
            }
        };
        // The coordinator is gone (or broke the session off): reconnect and go on.
        let patience = Duration::from_secs_f64(worker.job.cfg.cluster.reconnect_timeout_s);
        tracing::warn!(error = %lost, "lost the coordinator; reconnecting for up to {patience:?}");
        let request = JoinRequest {
            last_generation: worker.generation,
            ..request.clone()
        };
        drop(session);
        session = Session::join(
            &args.coordinator,
            request,
            Instant::now() + patience,
            peer.runtime(),
            true,
        )
        .with_context(|| format!("the coordinator was lost ({lost}) and did not come back"))?;
        if session.config_sha256() != worker.job.config_sha256 {
            bail!(
                "the coordinator came back with another config (SHA-256 {})",
                session.config_sha256()
            );
        }
        tracing::info!(worker = %worker_id, "rejoined the run");
    }
}

fn stopped(reason: &str, failed: bool) -> anyhow::Result<()> {
    if failed {
        bail!("the coordinator stopped the run: {reason}");
    }
    tracing::info!(reason, "stopped");
    Ok(())
}

/// How a session ended.
enum Served {
    /// The coordinator said stop.
    Stopped { reason: String, failed: bool },
}

/// Why a session could not go on.
enum Failure {
    /// The coordinator is unreachable or broke the session off: reconnect.
    Coordinator(WorkerError),
    /// This worker cannot go on (bad data, non-finite loss, a bug): the run fails.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<WorkerError>() {
            Ok(e @ WorkerError::Coordinator(_)) => Failure::Coordinator(e),
            Ok(e) => Failure::Fatal(e.into()),
            Err(e) => Failure::Fatal(e),
        }
    }
}

impl From<WorkerError> for Failure {
    fn from(e: WorkerError) -> Self {
        Failure::from(anyhow::Error::from(e))
    }
}

impl From<elbo_datasets::DataError> for Failure {
    fn from(e: elbo_datasets::DataError) -> Self {
        Failure::Fatal(e.into())
    }
}

/// How one generation's training ended.
enum Trained {
    /// The stop step was reached.
    Done,
    /// Halted at a step boundary (told to, or the ring broke).
    Halted,
    /// The coordinator said stop.
    Stopped { reason: String, failed: bool },
}

/// A worker's training state, kept across generations and reconnections.
struct Worker {
    job: Job,
    trainer: Trainer,
    /// Data cursor after the last step taken.
    cursor: Cursor,
    /// The newest generation this worker has been in.
    generation: u64,
    /// The generation it last reported halting in.
    halted: Option<u64>,
    device: candle_core::Device,
    audit: Option<BufWriter<File>>,
    throttle: Duration,
}

impl Worker {
    /// Follows the coordinator's commands until it says stop or the session breaks.
    fn serve(&mut self, session: &Session, peer: &BoundPeer) -> Result<Served, Failure> {
        let cluster = &self.job.cfg.cluster;
        let patience =
            Duration::from_secs_f64(cluster.rendezvous_timeout_s + cluster.step_timeout_s + 60.0);
        loop {
            match session.next_command(patience)? {
                Command::Start(start) => {
                    self.generation = start.generation;
                    self.adopt(&start)?;
                    match self.train(session, peer, &start)? {
                        Trained::Done => {}
                        Trained::Halted => self.halt(session, start.generation)?,
                        Trained::Stopped { reason, failed } => {
                            return Ok(Served::Stopped { reason, failed })
                        }
                    }
                }
                Command::Halt { generation } => {
                    if generation == self.generation {
                        self.halt(session, generation)?;
                    }
                }
                Command::SendState { generation } => {
                    let files = self.job.checkpoint_files(&self.trainer, self.cursor)?;
                    session.upload_checkpoint(generation, self.trainer.step(), files, true)?;
                }
                Command::Stop { reason, failed } => return Ok(Served::Stopped { reason, failed }),
            }
        }
    }

    /// Says where this worker stands, once per generation.
    fn halt(&mut self, session: &Session, generation: u64) -> Result<(), Failure> {
        if self.halted != Some(generation) {
            self.halted = Some(generation);
            tracing::info!(generation, step = self.trainer.step(), "halted");
            session.halted(generation, self.trainer.step())?;
        }
        Ok(())
    }

    /// Takes on the state a generation starts from.
    fn adopt(&mut self, start: &StartCommand) -> anyhow::Result<()> {
        if let Some(files) = &start.checkpoint {
            let origin = Path::new("<state from the coordinator>");
            let ck = checkpoint::decode(files, self.trainer.layout(), origin)?;
            self.cursor = restore(&mut self.trainer, ck)?;
        } else if self.trainer.step() != start.start_step {
            if start.start_step != 0 {
                bail!(
                    "generation {} starts at step {} but this worker is at step {} and was sent no state",
                    start.generation,
                    start.start_step,
                    self.trainer.step()
                );
            }
            self.trainer = self.job.trainer(&self.device)?;
            self.cursor = Cursor::start(0);
        }
        if self.trainer.step() != start.start_step {
            bail!(
                "the state sent for generation {} is at step {}, not {}",
                start.generation,
                self.trainer.step(),
                start.start_step
            );
        }
        self.cursor = self.job.normalise(self.cursor);
        Ok(())
    }

    /// Trains one generation from its starting point until the stop step or a halt.
    fn train(
        &mut self,
        session: &Session,
        peer: &BoundPeer,
        start: &StartCommand,
    ) -> Result<Trained, Failure> {
        let cfg = &self.job.cfg;
        let (rank, world) = (start.rank as usize, start.world as usize);
        let step_timeout = Duration::from_secs_f64(cfg.cluster.step_timeout_s);
        let next = start.peers[(rank + 1) % world];
        let ring = match peer.connect(
            start.generation,
            rank,
            world,
            next,
            Instant::now() + step_timeout,
            start.abort.clone(),
        ) {
            Ok(ring) => ring,
            Err(WorkerError::Ring(why)) => {
                tracing::warn!(why, "the ring did not form");
                return Ok(Trained::Halted);
            }
            Err(e) => return Err(e.into()),
        };
        let settings = RingSettings {
            chunk_len: (cfg.cluster.ring_chunk_kib as usize * 1024 / 4).max(1),
            depth: cfg.cluster.ring_depth as usize,
            timeout: step_timeout,
        };
        let mut reduce = GrpcAllReduce::new(ring, start.generation, settings)?;
        // Whatever ends the generation, a checkpoint on its way is taken (or refused) first, so
        // the coordinator has it before this worker halts or finishes.
        let mut uploading = None;
        let ended = self.generation_steps(session, start, &mut reduce, &mut uploading);
        if let Some(upload) = uploading {
            upload.wait()?;
        }
        ended
    }

    /// The steps of one generation (see [`Worker::train`]).
    fn generation_steps(
        &mut self,
        session: &Session,
        start: &StartCommand,
        reduce: &mut GrpcAllReduce,
        uploading: &mut Option<Upload>,
    ) -> Result<Trained, Failure> {
        let cfg = &self.job.cfg;
        let rank = start.rank as usize;
        let every = |n: u64, step: u64| n > 0 && step % n == 0;
        if self.trainer.step() >= start.stop_step {
            return Ok(Trained::Done);
        }
        while self.cursor.epoch < cfg.train.epochs && self.trainer.step() < start.stop_step {
            let plan = self
                .job
                .plan
                .rank_plan(self.cursor, start.world, start.rank)?;
            let mut stream =
                BatchStream::new(self.job.train.clone(), plan, build::binarizer(cfg), 1);
            loop {
                let waited = Instant::now();
                let Some(batch) = stream.next() else { break };
                let batch = batch?;
                let data = waited.elapsed();
                match session.poll_command()? {
                    None => {}
                    Some(Command::Halt { .. }) => return Ok(Trained::Halted),
                    Some(Command::Stop { reason, failed }) => {
                        return Ok(Trained::Stopped { reason, failed })
                    }
                    Some(other) => {
                        return Err(Failure::Fatal(anyhow::anyhow!(
                            "the coordinator sent {other:?} while this worker trains"
                        )))
                    }
                }
                if !self.throttle.is_zero() {
                    std::thread::sleep(self.throttle);
                }
                let step = self.trainer.step();
                if let Some(audit) = self.audit.as_mut() {
                    for id in &batch.ids {
                        writeln!(audit, "{} {step} {id}", start.generation)
                            .context("cannot write --audit-rows")?;
                    }
                    audit.flush().context("cannot write --audit-rows")?;
                }
                let report = match self.trainer.train_step(&batch, reduce, &self.device) {
                    Ok(report) => report,
                    Err(WorkerError::Ring(why)) => {
                        tracing::warn!(step, why, "the step was aborted");
                        return Ok(Trained::Halted);
                    }
                    Err(e) => return Err(e.into()),
                };
                self.cursor = self.job.normalise(batch.cursor_after);
                let step = self.trainer.step();
                let checksum = every(start.checksum_every, step)
                    .then(|| session::checksum(self.trainer.params()));
                session.report(&Report {
                    generation: start.generation,
                    step: &report,
                    rows: batch.rows() as u64,
                    data,
                    checksum,
                    cursor: (self.cursor.epoch, self.cursor.step),
                    global_rows: batch.global_rows,
                })?;
                let last = step >= start.stop_step;
                if rank == 0 && (last || every(start.checkpoint_every, step)) {
                    // One checkpoint in flight at a time; it travels while training goes on.
                    if let Some(previous) = uploading.take() {
                        previous.wait()?;
                    }
                    let files = self.job.checkpoint_files(&self.trainer, self.cursor)?;
                    *uploading = Some(session.start_upload(start.generation, step, files, false));
                }
                if last {
                    break;
                }
            }
            self.cursor = self.job.normalise(self.cursor);
        }
        Ok(Trained::Done)
    }
}
