//! A worker's session with the coordinator: join, heartbeats in the background, commands as
//! they arrive, step reports that never hold up training, halts, and state and checkpoint
//! uploads. Each generation's `Start` carries its own abort flag, raised the moment a `Halt` or
//! `Stop` arrives or the session breaks, so a ring wait gives up at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elbo_proto::auth::{self, Key};
use elbo_proto::tls::Tls;
use elbo_proto::v1 as pb;
use elbo_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc as tokio_mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::checkpoint::Files;
use crate::error::{chain, handshake_failed, Result, WorkerError};
use crate::trainer::StepReport;

/// The largest message a worker accepts from the coordinator (a `Start` carries a checkpoint).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// Who a worker is and what run it asks to join.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The run id the coordinator must have.
    pub run_id: String,
    /// The shared secret of the run.
    pub token: String,
    /// SHA-256 of the worker's own config, if it has one (the coordinator refuses a mismatch).
    pub config_sha256: Option<String>,
    /// Unique among the run's workers.
    pub worker_id: String,
    /// Where this worker serves the ring.
    pub peer_address: SocketAddr,
    /// What it trains on.
    pub device: String,
    /// The newest ring generation this worker has been in (0 if none).
    pub last_generation: u64,
}

/// Train as `rank` of `world` in a generation of the ring.
#[derive(Debug, Clone)]
pub struct StartCommand {
    /// The ring generation.
    pub generation: u64,
    /// This worker's rank.
    pub rank: u32,
    /// Ring size.
    pub world: u32,
    /// Peer addresses by rank.
    pub peers: Vec<SocketAddr>,
    /// Train until this global step (exclusive).
    pub stop_step: u64,
    /// Report a parameter checksum every this many steps (0 = never).
    pub checksum_every: u64,
    /// Rank 0 uploads a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// The state to start from; `None`: keep this worker's own, which must be `start_step`
    /// steps in (or, with `start_step` 0, start afresh).
    pub checkpoint: Option<Files>,
    /// Global steps taken before this generation's first step.
    pub start_step: u64,
    /// The generation's ring key: it authenticates the ring streams of its members.
    pub ring_key: Key,
    /// Raised when the generation is aborted (a `Halt` or `Stop` arrives, the session breaks).
    pub abort: Arc<AtomicBool>,
}

/// What the coordinator asks.
#[derive(Debug, Clone)]
pub enum Command {
    /// Start training in a generation.
    Start(StartCommand),
    /// Abort the generation at a step boundary and say where this worker stands.
    Halt {
        /// The generation to halt.
        generation: u64,
    },
    /// Send this worker's state to the coordinator.
    SendState {
        /// The generation asked in.
        generation: u64,
    },
    /// End the session: the run finished (`failed` false) or failed.
    Stop {
        /// Why.
        reason: String,
        /// Whether the run failed.
        failed: bool,
    },
}

/// A step as reported to the coordinator.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// The generation it ran in.
    pub generation: u64,
    /// What the trainer said.
    pub step: &'a StepReport,
    /// Rows this worker trained on.
    pub rows: u64,
    /// Time spent waiting for the batch.
    pub data: Duration,
    /// Parameter checksum after the step, on checksum steps.
    pub checksum: Option<u64>,
    /// Data cursor after the step: (epoch, step within the epoch).
    pub cursor: (u64, u64),
    /// Rows of the global batch.
    pub global_rows: u64,
    /// Test-set figures of the model after the step (rank 0, on evaluation steps).
    pub test: &'a BTreeMap<String, f64>,
}

/// Named figures as they go on the wire.
fn wire_terms(terms: &BTreeMap<String, f64>) -> Vec<pb::Term> {
    terms
        .iter()
        .map(|(name, value)| pb::Term {
            name: name.clone(),
            value: *value,
        })
        .collect()
}

/// What goes to the coordinator in order on the report queue.
enum Outbound {
    Report(pb::StepReport),
    Halted(pb::Halted),
}

/// Puts a session's credential on each of its calls.
#[derive(Clone)]
struct SessionCredential {
    session: AsciiMetadataValue,
    credential: AsciiMetadataValue,
}

impl tonic::service::Interceptor for SessionCredential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        metadata.insert(auth::SESSION, self.session.clone());
        metadata.insert(auth::AUTHORIZATION, self.credential.clone());
        Ok(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, SessionCredential>>;

/// A joined session.
pub struct Session {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Client,
    session: u64,
    config_toml: String,
    config_sha256: String,
    commands: mpsc::Receiver<Result<Command>>,
    reports: tokio_mpsc::UnboundedSender<Outbound>,
    _heartbeats: tokio_mpsc::UnboundedSender<pb::WorkerMessage>,
}

fn lost(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Coordinator(e.to_string())
}

/// A key the coordinator sent (`what` names it), if it has [`auth::KEY_BYTES`] bytes.
fn key_from(bytes: &[u8], what: &str) -> Result<Key> {
    Key::from_slice(bytes).ok_or_else(|| {
        lost(format!(
            "{what} of {} bytes, expected {}",
            bytes.len(),
            auth::KEY_BYTES
        ))
    })
}

fn parse_start(s: pb::Start, abort: Arc<AtomicBool>) -> Result<StartCommand> {
    let peers = s
        .peers
        .iter()
        .map(|p| {
            p.parse::<SocketAddr>()
                .map_err(|_| lost(format!("Start names peer address {p:?}, not host:port")))
        })
        .collect::<Result<Vec<_>>>()?;
    if s.world == 0 || s.rank >= s.world || peers.len() != s.world as usize {
        return Err(lost(format!(
            "Start gives rank {} of world {} with {} peer addresses",
            s.rank,
            s.world,
            peers.len()
        )));
    }
    let ring_key = key_from(&s.ring_key, "Start carries a ring key")?;
    let checkpoint = (!s.checkpoint.is_empty())
        .then(|| s.checkpoint.into_iter().map(|f| (f.name, f.data)).collect());
    Ok(StartCommand {
        generation: s.generation,
        rank: s.rank,
        world: s.world,
        peers,
        stop_step: s.stop_step,
        checksum_every: s.checksum_every,
        checkpoint_every: s.checkpoint_every,
        checkpoint,
        start_step: s.start_step,
        ring_key,
        abort,
    })
}

/// Whether a refused join may succeed later (the old session of a reconnecting worker is still
/// being dropped, the run is momentarily full, the coordinator is starting).
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::AlreadyExists
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// First retry after 100 ms, doubling up to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5))
}

impl Session {
    /// Connects to the coordinator at `url` and joins its run, retrying with exponential
    /// backoff until `deadline` while it cannot be reached (and, when `retry_refusals`, while it
    /// refuses for a reason that may pass: a reconnecting worker's old session not yet dropped,
    /// a full run). The session's traffic runs on `runtime` (the worker's peer runtime: one I/O
    /// thread per worker); with `tls`, over TLS only (an `https://` URL), else in plaintext
    /// (`http://`).
    pub fn join(
        url: &str,
        request: JoinRequest,
        deadline: Instant,
        runtime: Arc<tokio::runtime::Runtime>,
        retry_refusals: bool,
        tls: Option<&Tls>,
    ) -> Result<Session> {
        let mut attempt = 0;
        loop {
            match Self::join_once(url, &request, deadline, &runtime, tls) {
                Ok(session) => return Ok(session),
                Err(Refusal::Final(e)) => return Err(e),
                Err(Refusal::Transient(e)) if !retry_refusals || Instant::now() >= deadline => {
                    return Err(e)
                }
                Err(Refusal::Transient(e)) => {
                    tracing::info!(error = %e, "joining again");
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
            }
        }
    }

    fn join_once(
        url: &str,
        request: &JoinRequest,
        deadline: Instant,
        runtime: &Arc<tokio::runtime::Runtime>,
        tls: Option<&Tls>,
    ) -> Result<Session, Refusal> {
        let request = request.clone();
        let runtime = runtime.clone();
        let scheme = if tls.is_some() { "https://" } else { "http://" };
        if !url.starts_with(scheme) {
            let why = if tls.is_some() {
                "expected https://HOST:PORT: TLS is configured"
            } else {
                "expected http://HOST:PORT (https:// needs TLS: --tls-cert, --tls-key, --tls-ca)"
            };
            return Err(WorkerError::Invalid(format!("coordinator URL {url:?}: {why}")).into());
        }
        let token: AsciiMetadataValue = auth::bearer(&request.token).parse().map_err(|_| {
            WorkerError::Invalid(
                "the run token (--token, ELBO_TOKEN): expected printable ASCII without spaces"
                    .into(),
            )
        })?;
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| WorkerError::Invalid(format!("coordinator URL {url:?}: {e}")))?;
        if let Some(tls) = tls {
            let host = endpoint.uri().host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            endpoint = endpoint
                .tls_config(tls.client(&host))
                .map_err(|e| WorkerError::Invalid(format!("TLS to {url}: {e:?}")))?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = runtime.block_on(async {
            let mut attempt = 0;
            loop {
                match endpoint.connect().await {
                    Ok(c) => return Ok(c),
                    Err(e) if handshake_failed(&e) => {
                        return Err(lost(format!(
                            "TLS with the coordinator at {url} failed: {}",
                            chain(&e)
                        )))
                    }
                    Err(e) if Instant::now() >= deadline => {
                        return Err(lost(format!("cannot reach the coordinator at {url}: {e}")))
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                    }
                }
            }
        })?;
        let (up, up_rx) = tokio_mpsc::unbounded_channel();
        let join = pb::Join {
            run_id: request.run_id,
            config_sha256: request.config_sha256.unwrap_or_default(),
            worker_id: request.worker_id,
            peer_address: request.peer_address.to_string(),
            device: request.device,
            last_generation: request.last_generation,
        };
        up.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Join(join)),
        })
        .map_err(lost)?;
        let mut session_client = CoordinatorClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut open = tonic::Request::new(UnboundedReceiverStream::new(up_rx));
        open.metadata_mut().insert(auth::AUTHORIZATION, token);
        let refused = |s: tonic::Status| {
            let e = match std::error::Error::source(&s) {
                // No answer: the connection itself failed.
                Some(cause) if tls.is_none() => lost(format!(
                    "cannot talk to the coordinator at {url}: {} (a coordinator with TLS answers only https://, with the run's certificates)",
                    chain(cause)
                )),
                Some(cause) => lost(format!(
                    "cannot talk to the coordinator at {url}: {}",
                    chain(cause)
                )),
                None => lost(format!("the coordinator refused to join: {}", s.message())),
            };
            if transient(&s) {
                Refusal::Transient(e)
            } else {
                Refusal::Final(e)
            }
        };
        let mut downstream = match runtime.block_on(session_client.session(open)) {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(refused(s)),
        };
        let welcome = runtime.block_on(async {
            match tokio::time::timeout(Duration::from_secs(30), downstream.next()).await {
                Ok(Some(Ok(pb::Command {
                    kind: Some(pb::command::Kind::Welcome(w)),
                }))) => Ok(w),
                Ok(Some(Err(s))) => Err(refused(s)),
                Ok(_) => Err(Refusal::Transient(lost(
                    "the coordinator closed the session before welcoming",
                ))),
                Err(_) => Err(Refusal::Transient(lost(
                    "no welcome from the coordinator within 30 s",
                ))),
            }
        })?;
        let credential = key_from(&welcome.credential, "Welcome carries a credential")?;
        let credential = SessionCredential {
            session: AsciiMetadataValue::from(welcome.session),
            credential: auth::bearer(&credential.to_hex())
                .parse()
                .map_err(|_| lost("a session credential is not a header value"))?,
        };
        let client = CoordinatorClient::with_interceptor(channel, credential)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (commands_tx, commands) = mpsc::channel();
        let report_failed = commands_tx.clone();
        // The abort flag of the newest generation: raised by anything that ends it.
        let mut abort = Arc::new(AtomicBool::new(false));
        runtime.spawn(async move {
            loop {
                let command = match downstream.next().await {
                    Some(Ok(pb::Command {
                        kind: Some(pb::command::Kind::Start(s)),
                    })) => {
                        abort.store(true, Ordering::Relaxed);
                        abort = Arc::new(AtomicBool::new(false));
                        parse_start(s, abort.clone()).map(Command::Start)
                    }
                    Some(Ok(pb::Command {
                        kind: Some(pb::command::Kind::Halt(h)),
                    })) => Ok(Command::Halt {
                        generation: h.generation,
                    }),
                    Some(Ok(pb::Command {
                        kind: Some(pb::command::Kind::SendState(s)),
                    })) => Ok(Command::SendState {
                        generation: s.generation,
                    }),
                    Some(Ok(pb::Command {
                        kind: Some(pb::command::Kind::Stop(s)),
                    })) if s.resumable => Err(lost(format!(
                        "the coordinator stopped before the run's end ({}); a restarted coordinator resumes it",
                        s.reason
                    ))),
                    Some(Ok(pb::Command {
                        kind: Some(pb::command::Kind::Stop(s)),
                    })) => Ok(Command::Stop {
                        reason: s.reason,
                        failed: s.failed,
                    }),
                    Some(Ok(other)) => Err(lost(format!("unexpected command {other:?}"))),
                    Some(Err(status)) => Err(lost(format!(
                        "the session with the coordinator broke: {}",
                        status.message()
                    ))),
                    None => Err(lost("the coordinator closed the session")),
                };
                if !matches!(command, Ok(Command::Start(_) | Command::SendState { .. })) {
                    abort.store(true, Ordering::Relaxed);
                }
                let end = command.is_err() || matches!(command, Ok(Command::Stop { .. }));
                if commands_tx.send(command).is_err() || end {
                    return;
                }
            }
        });
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(10)));
        let beat = up.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let heartbeat = pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {})),
                };
                if beat.send(heartbeat).is_err() {
                    return;
                }
            }
        });
        // Reports go out in order on their own task, so training never waits for them; a
        // refused report ends the session like a broken stream does.
        let (reports, mut pending) = tokio_mpsc::unbounded_channel::<Outbound>();
        let mut report_client = client.clone();
        runtime.spawn(async move {
            while let Some(message) = pending.recv().await {
                let (what, sent) = match message {
                    Outbound::Report(r) => {
                        ("a step report", report_client.report(r).await.map(|_| ()))
                    }
                    Outbound::Halted(h) => ("a halt", report_client.halt(h).await.map(|_| ())),
                };
                if let Err(status) = sent {
                    let reason = format!("the coordinator refused {what}: {}", status.message());
                    let _ = report_failed.send(Err(lost(reason)));
                    return;
                }
            }
        });
        Ok(Session {
            runtime,
            client,
            session: welcome.session,
            config_toml: welcome.config_toml,
            config_sha256: welcome.config_sha256,
            commands,
            reports,
            _heartbeats: up,
        })
    }

    /// The run's config (TOML) as the coordinator sent it.
    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    /// SHA-256 of the run's config, as the coordinator computed it.
    pub fn config_sha256(&self) -> &str {
        &self.config_sha256
    }

    /// The next command, waiting at most `timeout`.
    pub fn next_command(&self, timeout: Duration) -> Result<Command> {
        match self.commands.recv_timeout(timeout) {
            Ok(command) => command,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(lost(format!(
                "no command from the coordinator within {timeout:?}"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(lost("the session with the coordinator ended"))
            }
        }
    }

    /// A command if one has arrived (errors if the session broke).
    pub fn poll_command(&self) -> Result<Option<Command>> {
        match self.commands.try_recv() {
            Ok(command) => command.map(Some),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(lost("the session with the coordinator ended"))
            }
        }
    }

    /// Queues a step report (sent in order in the background).
    pub fn report(&self, report: &Report<'_>) -> Result<()> {
        let r = report.step;
        let t = r.timings;
        let message = pb::StepReport {
            session: self.session,
            generation: report.generation,
            step: r.step,
            terms: wire_terms(&r.terms),
            grad_norm: r.grad_norm,
            lr: r.lr,
            applied: r.applied,
            rows: report.rows,
            data_s: report.data.as_secs_f64(),
            compute_s: t.compute.as_secs_f64(),
            reduce_s: t.reduce.as_secs_f64(),
            update_s: t.update.as_secs_f64(),
            checksum: report.checksum,
            epoch: report.cursor.0,
            step_in_epoch: report.cursor.1,
            global_rows: report.global_rows,
            test: wire_terms(report.test),
        };
        self.reports
            .send(Outbound::Report(message))
            .map_err(|_| lost("the report stream to the coordinator is closed"))
    }

    /// Says this worker has halted in `generation` after `step` global steps (queued behind its
    /// step reports, so the coordinator has them all first).
    pub fn halted(&self, generation: u64, step: u64) -> Result<()> {
        let message = pb::Halted {
            session: self.session,
            generation,
            step,
        };
        self.reports
            .send(Outbound::Halted(message))
            .map_err(|_| lost("the report stream to the coordinator is closed"))
    }

    /// Tells the coordinator this worker cannot go on (the run fails with `reason`); best effort.
    pub fn fail(&self, reason: &str) {
        let failure = pb::Failure {
            session: self.session,
            reason: reason.to_string(),
        };
        let mut client = self.client.clone();
        let sent = self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), client.fail(failure)).await
        });
        if !matches!(sent, Ok(Ok(_))) {
            tracing::warn!("could not tell the coordinator why this worker stops");
        }
    }

    /// Hands a checkpoint (or, `requested`, this worker's state when asked) to the coordinator
    /// and waits until it is taken.
    pub fn upload_checkpoint(
        &self,
        generation: u64,
        step: u64,
        files: Files,
        requested: bool,
    ) -> Result<()> {
        self.start_upload(generation, step, files, requested).wait()
    }

    /// Starts handing a checkpoint to the coordinator; training goes on while it travels and is
    /// written. [`Upload::wait`] says whether it was taken.
    pub fn start_upload(
        &self,
        generation: u64,
        step: u64,
        files: Files,
        requested: bool,
    ) -> Upload {
        let upload = pb::CheckpointUpload {
            session: self.session,
            generation,
            step,
            files: files
                .into_iter()
                .map(|(name, data)| pb::File { name, data })
                .collect(),
            requested,
        };
        let mut client = self.client.clone();
        let task = self.runtime.spawn(async move {
            client
                .save_checkpoint(upload)
                .await
                .map(|_| ())
                .map_err(|s| {
                    lost(format!(
                        "the coordinator did not save the checkpoint of step {step}: {}",
                        s.message()
                    ))
                })
        });
        Upload {
            runtime: self.runtime.clone(),
            task,
        }
    }
}

/// A checkpoint on its way to the coordinator.
pub struct Upload {
    runtime: Arc<tokio::runtime::Runtime>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Upload {
    /// Waits until the coordinator has taken (and, for a checkpoint, written) it.
    pub fn wait(self) -> Result<()> {
        self.runtime
            .block_on(self.task)
            .map_err(|e| WorkerError::Internal(format!("checkpoint upload: {e}")))?
    }
}

/// Why a join attempt failed.
enum Refusal {
    /// It may succeed later.
    Transient(WorkerError),
    /// It will not.
    Final(WorkerError),
}

impl From<WorkerError> for Refusal {
    fn from(e: WorkerError) -> Self {
        Refusal::Final(e)
    }
}
