//! `elbo worker`: joins a coordinator's run, trains its share of every global batch in the
//! shared loop, takes part in the ring all-reduce, reports each step, and (as rank 0) hands
//! checkpoints over. It lives through generations: when the ring breaks or the coordinator
//! halts it, it stops at a step boundary, says where it stands, hands its state over when
//! asked, and trains on in the next generation; when the coordinator is lost it reconnects with
//! backoff (`cluster.reconnect_timeout_s`) and goes on from whatever state the coordinator gives
//! it. What to do at each turn is decided in `generation.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elbo_datasets::{Batch, Cursor};
use elbo_settings::{Layers, TlsConfig};
use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce};
use elbo_worker::ring::RingSettings;
use elbo_worker::session::{JoinRequest, Report, Session, StartCommand, Upload};
use elbo_worker::{StepReport, Trainer, WorkerError};

use crate::build::{device, Engine};
use crate::error::{io, EngineError, Result};
use crate::eval::{scalars, test_due, test_figures};
use crate::generation::{self, Adopt, Fate, Idle, Standing, Training};
use crate::job::Job;
use crate::run_dir;
use crate::steps::{self, Driver, Ended, Share};
use crate::telemetry::{self, StepFigures, Telemetry};

/// The largest ring chunk any config allows (cluster.ring_chunk_kib ≤ 16 MiB), in f32s.
const MAX_CHUNK_VALUES: usize = (16 << 20) / 4;

/// How a worker joins and trains.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's URL, e.g. `http://10.0.0.5:50051`.
    pub coordinator: String,
    /// The run id the coordinator serves (its run.name).
    pub run_id: String,
    /// The run's shared secret.
    pub token: String,
    /// This worker's id, unique in the run.
    pub worker_id: String,
    /// Where to serve the ring (port 0: any free port).
    pub listen: SocketAddr,
    /// The address peers reach this worker at (needed when `listen` is unspecified).
    pub advertise: Option<SocketAddr>,
    /// Device: `cpu` or `cuda:N`.
    pub device: String,
    /// The worker's own config file: the coordinator refuses the worker if it differs.
    pub config: Option<PathBuf>,
    /// Give up if the coordinator cannot be reached for this long.
    pub connect_timeout: Duration,
    /// Append `generation step row-id` for every row trained to this file.
    pub audit_rows: Option<PathBuf>,
    /// Sleep this long before each step (fault-injection tests and demos).
    pub throttle: Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// TLS to the coordinator and on the ring (from `--tls-*`; off when its files are empty).
    pub tls: TlsConfig,
}

/// `elbo worker`: returns when the coordinator says the run is over (an error if it failed).
pub fn run(engine: &Engine, options: &WorkerOptions) -> Result<()> {
    let id = &options.worker_id;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !(1..=253).contains(&id.len()) || !id.chars().all(plain) || id.starts_with('.') {
        return Err(EngineError::Invalid(format!("--worker-id {id:?}: expected 1–253 characters of A–Z, a–z, 0–9, '-', '_', '.' (not starting with '.')")));
    }
    let device = device(&options.device)?;
    let audit = match &options.audit_rows {
        Some(path) => {
            let path = if path.is_dir() {
                path.join(id)
            } else {
                path.clone()
            };
            let file = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(format!("cannot open --audit-rows {}", path.display())))?;
            Some(BufWriter::new(file))
        }
        None => None,
    };
    let telemetry = Telemetry::new();
    let _server = options
        .metrics_addr
        .map(|addr| telemetry::serve(addr, telemetry.clone()))
        .transpose()?;
    let tls = crate::tls::load(&options.tls, crate::tls::FLAGS)?;
    let peer = BoundPeer::bind(options.listen, MAX_CHUNK_VALUES, tls.clone())?;
    let advertise = match options.advertise {
        Some(a) => a,
        None if options.listen.ip().is_unspecified() => {
            return Err(EngineError::Invalid(format!(
                "--listen {} does not say where peers reach this worker: pass --advertise IP:PORT",
                options.listen
            )))
        }
        None => peer.local_addr(),
    };
    let own_config = match &options.config {
        Some(path) => {
            let cfg = engine.load_config(&Layers {
                file: Some(path.clone()),
                ..Default::default()
            })?;
            Some(run_dir::config_sha256(&cfg))
        }
        None => None,
    };
    let request = JoinRequest {
        run_id: options.run_id.clone(),
        token: options.token.clone(),
        config_sha256: own_config,
        worker_id: id.clone(),
        peer_address: advertise,
        device: options.device.clone(),
        last_generation: 0,
    };
    let deadline = Instant::now() + options.connect_timeout;
    let mut session = Session::join(
        &options.coordinator,
        request.clone(),
        deadline,
        peer.runtime(),
        false,
        tls.as_ref(),
    )?;
    let label = PathBuf::from(format!("<config from {}>", options.coordinator));
    let cfg = elbo_settings::load_toml(session.config_toml(), &label, &engine.registry)?;
    if run_dir::config_sha256(&cfg) != session.config_sha256() {
        return Err(EngineError::Failed(
            "the config received from the coordinator does not match its SHA-256".into(),
        ));
    }
    tracing::info!(worker = %id, peer = %advertise, "joined the run");
    let job = Job::prepare(engine, cfg)?;
    let trainer = job.trainer(&device)?;
    telemetry.run(job.total_steps, 0);
    let mut worker = Worker {
        telemetry,
        job,
        trainer,
        cursor: Cursor::start(0),
        generation: 0,
        halted: None,
        device,
        audit,
        throttle: options.throttle,
    };
    loop {
        let lost = match worker.serve(&session, &peer) {
            Ok((reason, failed)) => return stopped(&reason, failed),
            Err(e) if generation::fate(&e) == Fate::Reconnect => e,
            Err(e) => {
                session.fail(&e.to_string());
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
            &options.coordinator,
            request,
            Instant::now() + patience,
            peer.runtime(),
            true,
            tls.as_ref(),
        )
        .map_err(|e| {
            EngineError::Failed(format!(
                "the coordinator was lost ({lost}) and did not come back: {e}"
            ))
        })?;
        if session.config_sha256() != worker.job.config_sha256 {
            return Err(EngineError::Failed(format!(
                "the coordinator came back with another config (SHA-256 {})",
                session.config_sha256()
            )));
        }
        tracing::info!(worker = %id, "rejoined the run");
    }
}

fn stopped(reason: &str, failed: bool) -> Result<()> {
    if failed {
        return Err(EngineError::Failed(format!(
            "the coordinator stopped the run: {reason}"
        )));
    }
    tracing::info!(reason, "stopped");
    Ok(())
}

/// A worker's training state, kept across generations and reconnections.
struct Worker {
    telemetry: Arc<Telemetry>,
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
    fn standing(&self) -> Standing {
        Standing {
            step: self.trainer.step(),
            generation: self.generation,
            halted: self.halted,
        }
    }

    /// Follows the coordinator's commands until it says stop (why, and whether the run
    /// failed) or the session breaks.
    fn serve(&mut self, session: &Session, peer: &BoundPeer) -> Result<(String, bool)> {
        let cluster = &self.job.cfg.cluster;
        let patience =
            Duration::from_secs_f64(cluster.rendezvous_timeout_s + cluster.step_timeout_s + 60.0);
        loop {
            let command = session.next_command(patience)?;
            match generation::on_idle(self.standing(), &command) {
                Idle::Start(start) => {
                    self.generation = start.generation;
                    self.adopt(start)?;
                    match self.train(session, peer, start)? {
                        Ended::Done => {}
                        Ended::Stopped(Stop::Halted) => self.halt(session, start.generation)?,
                        Ended::Stopped(Stop::Run { reason, failed }) => {
                            return Ok((reason, failed))
                        }
                    }
                }
                Idle::ReportHalt(generation) => self.halt(session, generation)?,
                Idle::Ignore => {}
                Idle::SendState(generation) => {
                    let files = self.job.checkpoint_files(&self.trainer, self.cursor)?;
                    session.upload_checkpoint(generation, self.trainer.step(), files, true)?;
                }
                Idle::Stop { reason, failed } => return Ok((reason, failed)),
            }
        }
    }

    /// Says where this worker stands, once per generation.
    fn halt(&mut self, session: &Session, generation: u64) -> Result<()> {
        if generation::halt_once(self.standing(), generation) {
            self.halted = Some(generation);
            tracing::info!(generation, step = self.trainer.step(), "halted");
            session.halted(generation, self.trainer.step())?;
        }
        Ok(())
    }

    /// Takes on the state a generation starts from.
    fn adopt(&mut self, start: &StartCommand) -> Result<()> {
        match generation::adopt(self.trainer.step(), start).map_err(EngineError::Failed)? {
            Adopt::Restore => {
                let files = start.checkpoint.as_ref().expect("Restore has a state");
                let origin = Path::new("<state from the coordinator>");
                self.cursor = self.job.restore(&mut self.trainer, files, origin)?;
            }
            Adopt::Keep => {}
            Adopt::Fresh => {
                self.trainer = self.job.trainer(&self.device)?;
                self.cursor = Cursor::start(0);
            }
        }
        if self.trainer.step() != start.start_step {
            return Err(EngineError::Failed(format!(
                "the state sent for generation {} is at step {}, not {}",
                start.generation,
                self.trainer.step(),
                start.start_step
            )));
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
    ) -> Result<Ended<Stop>> {
        let cfg = &self.job.cfg;
        let (rank, world) = (start.rank as usize, start.world as usize);
        let step_timeout = Duration::from_secs_f64(cfg.cluster.step_timeout_s);
        let next = start.peers[(rank + 1) % world];
        let ring = peer.connect(
            start.generation,
            rank,
            world,
            &start.ring_key,
            next,
            Instant::now() + step_timeout,
            start.abort.clone(),
        );
        let settings = RingSettings {
            chunk_len: (cfg.cluster.ring_chunk_kib as usize * 1024 / 4).max(1),
            depth: cfg.cluster.ring_depth as usize,
            timeout: step_timeout,
        };
        let mut reduce = match ring.and_then(|r| GrpcAllReduce::new(r, start.generation, settings))
        {
            Ok(reduce) => reduce,
            Err(WorkerError::Ring(why)) => {
                tracing::warn!(why, "the ring did not form");
                return Ok(Ended::Stopped(Stop::Halted));
            }
            Err(e) => return Err(e.into()),
        };
        if self.trainer.step() >= start.stop_step {
            return Ok(Ended::Done);
        }
        let share = Share {
            world: start.world,
            rank: start.rank,
            stop_at: start.stop_step,
        };
        let mut driver = InRing {
            telemetry: &self.telemetry,
            job: &self.job,
            session,
            start,
            audit: self.audit.as_mut(),
            throttle: self.throttle,
            uploading: None,
        };
        let ended = steps::train(
            &self.job,
            &mut self.trainer,
            &mut self.cursor,
            share,
            &mut reduce,
            &self.device,
            &mut driver,
        );
        // Whatever ends the generation, a checkpoint on its way is taken (or refused) first,
        // so the coordinator has it before this worker halts or finishes.
        if let Some(upload) = driver.uploading.take() {
            upload.wait()?;
        }
        match ended {
            Err(e) if generation::fate(&e) == Fate::Halt => {
                tracing::warn!(step = self.trainer.step(), error = %e, "the step was aborted");
                Ok(Ended::Stopped(Stop::Halted))
            }
            other => other,
        }
    }
}

/// Why a generation's loop stopped early.
enum Stop {
    /// Halted at a step boundary (told to, or the ring broke).
    Halted,
    /// The coordinator said stop.
    Run { reason: String, failed: bool },
}

/// A worker around each step: commands from the coordinator (a halt or a stop ends the
/// generation at the step boundary), the row audit, step reports with the replica checksum, and
/// rank 0's checkpoints (one in flight at a time; it travels while training goes on).
struct InRing<'a> {
    telemetry: &'a Telemetry,
    job: &'a Job,
    session: &'a Session,
    start: &'a StartCommand,
    audit: Option<&'a mut BufWriter<File>>,
    throttle: Duration,
    uploading: Option<Upload>,
}

impl Driver for InRing<'_> {
    type Stop = Stop;

    fn before(&mut self, step: u64, batch: &Batch, _: Duration) -> Result<Option<Stop>> {
        if let Some(command) = self.session.poll_command()? {
            return match generation::on_training(&command) {
                Training::Halt => Ok(Some(Stop::Halted)),
                Training::Stop { reason, failed } => Ok(Some(Stop::Run { reason, failed })),
                Training::Refuse(why) => Err(EngineError::Failed(why)),
            };
        }
        if !self.throttle.is_zero() {
            std::thread::sleep(self.throttle);
        }
        if let Some(audit) = self.audit.as_mut() {
            let cannot = || "cannot write --audit-rows";
            let generation = self.start.generation;
            for id in &batch.ids {
                writeln!(audit, "{generation} {step} {id}").map_err(io(cannot()))?;
            }
            audit.flush().map_err(io(cannot()))?;
        }
        Ok(None)
    }

    fn after(
        &mut self,
        trainer: &Trainer,
        report: &StepReport,
        batch: &Batch,
        cursor: Cursor,
        data: Duration,
    ) -> Result<Option<Stop>> {
        let every = |n: u64, step: u64| n > 0 && step % n == 0;
        let step = trainer.step();
        self.telemetry.step(&StepFigures::trained(
            report,
            step,
            batch.rows() as u64,
            data,
            (self.start.world, self.start.generation),
        ));
        let checksum = if every(self.start.checksum_every, step) {
            Some(trainer.checksum()?)
        } else {
            None
        };
        let test = if self.start.rank == 0
            && test_due(&self.job.cfg, step, cursor, self.job.total_steps)
        {
            let figures = scalars(&test_figures(
                trainer.model(),
                &self.job.test,
                &self.job.cfg,
            )?);
            self.telemetry.test(&figures);
            figures
        } else {
            BTreeMap::new()
        };
        self.session.report(&Report {
            test: &test,
            generation: self.start.generation,
            step: report,
            rows: batch.rows() as u64,
            data,
            checksum,
            cursor: (cursor.epoch, cursor.step),
            global_rows: batch.global_rows,
        })?;
        let last = step >= self.start.stop_step;
        if self.start.rank == 0 && (last || every(self.start.checkpoint_every, step)) {
            if let Some(previous) = self.uploading.take() {
                previous.wait()?;
            }
            let files = self.job.checkpoint_files(trainer, cursor)?;
            self.uploading =
                Some(
                    self.session
                        .start_upload(self.start.generation, step, files, false),
                );
        }
        Ok(None)
    }
}
