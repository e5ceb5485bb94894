//! The gRPC face of the coordinator: the `Coordinator` service, grpc.health.v1 and server
//! reflection, the driver that feeds the state machine the passage of time until the run ends,
//! and the effects thread that carries out what the state machine decides (commands to workers,
//! steps to the run store), in the order it decided them, outside its lock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use elbo_proto::auth::Secret;
use elbo_proto::v1 as pb;
use elbo_proto::v1::coordinator_server::{self, CoordinatorServer};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Gate};
use crate::state::{Effect, Phase, Run, Upload};
use crate::{Aborter, CoordinatorError, Files, RunStore, Settings, Summary};

/// Commands to one worker.
type Outbox = mpsc::UnboundedSender<Result<pb::Command, Status>>;

/// Work for the effects thread, in the order it was decided.
enum Task {
    /// A session joined: its command stream.
    Register(u64, Outbox),
    /// Something the state machine decided.
    Do(Effect),
    /// Reply once everything queued before is done.
    Flush(std_mpsc::Sender<()>),
    /// End every command stream and stop.
    Shutdown,
}

/// The state machine, its effects queue and a wake-up for the driver.
pub(crate) struct Shared {
    run: Mutex<Run>,
    tasks: Mutex<std_mpsc::Sender<Task>>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self, task: Task) {
        // The effects thread outlives every transition (it stops on `Shutdown`, the last task).
        let _ = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(task);
    }

    /// Runs one transition at the current time under the lock and queues its effects.
    fn apply<R>(&self, transition: impl FnOnce(&mut Run, Instant) -> (R, Vec<Effect>)) -> R {
        let mut run = self.lock();
        let (result, effects) = transition(&mut run, Instant::now());
        for e in effects {
            self.queue(Task::Do(e));
        }
        drop(run);
        self.changed.notify_one();
        result
    }

    /// Runs a transition that may refuse its event.
    fn try_apply(
        &self,
        transition: impl FnOnce(&mut Run, Instant) -> Result<Vec<Effect>, Status>,
    ) -> Result<(), Status> {
        self.apply(|run, now| match transition(run, now) {
            Ok(fx) => (Ok(()), fx),
            Err(status) => (Err(status), Vec::new()),
        })
    }

    /// Admits a worker: its command stream is registered before its `Welcome` is sent.
    fn join(&self, join: &pb::Join, outbox: Outbox) -> Result<u64, Status> {
        let mut run = self.lock();
        let (id, effects) = run.join(join, Instant::now())?;
        self.queue(Task::Register(id, outbox));
        for e in effects {
            self.queue(Task::Do(e));
        }
        drop(run);
        self.changed.notify_one();
        Ok(id)
    }

    pub(crate) fn fail(&self, reason: String) {
        self.apply(|run, _| ((), run.fail(reason)));
    }

    pub(crate) fn drain(&self, reason: &str) {
        self.apply(|run, now| ((), run.drain(reason, now)));
    }

    /// Waits until every effect queued so far has been carried out.
    fn flush(&self) {
        let (done, wait) = std_mpsc::channel();
        self.queue(Task::Flush(done));
        let _ = wait.recv();
    }
}

/// The effects thread: sends commands to the workers' streams and records committed steps,
/// one task at a time in queue order. A step the store cannot record fails the run.
fn carry_out(tasks: std_mpsc::Receiver<Task>, store: Arc<dyn RunStore>, shared: Arc<Shared>) {
    let mut outboxes: BTreeMap<u64, Outbox> = BTreeMap::new();
    for task in tasks {
        match task {
            Task::Register(id, outbox) => {
                outboxes.insert(id, outbox);
            }
            Task::Do(Effect::Send(id, command)) => {
                // A closed stream means the session is ending; its reader reports it as left.
                if let Some(outbox) = outboxes.get(&id) {
                    let _ = outbox.send(Ok(command));
                }
            }
            Task::Do(Effect::Close(id)) => {
                outboxes.remove(&id);
            }
            Task::Do(Effect::Commit(step)) => {
                if let Err(e) = store.committed(&step) {
                    shared.fail(format!("cannot record step {}: {e}", step.step));
                }
            }
            Task::Flush(done) => {
                let _ = done.send(());
            }
            Task::Shutdown => return,
        }
    }
}

/// How long a new session may take to send its `Join`.
const JOIN_WAIT: Duration = Duration::from_secs(10);

struct Service {
    shared: Arc<Shared>,
    store: Arc<dyn RunStore>,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send>>;

#[tonic::async_trait]
impl coordinator_server::Coordinator for Service {
    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let remote = request.remote_addr();
        if request.extensions().get::<Caller>() != Some(&Caller::Worker) {
            return Err(Status::unauthenticated(
                "a session is opened with the run token",
            ));
        }
        let mut incoming = request.into_inner();
        let first = tokio::time::timeout(JOIN_WAIT, incoming.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Join within 10 s of opening the session"))?;
        let join = match first {
            Some(Ok(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Join(join)),
            })) => join,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "a session must start with a Join message",
                ))
            }
        };
        let (outbox, commands) = mpsc::unbounded_channel();
        let session = match self.shared.join(&join, outbox) {
            Ok(id) => id,
            Err(status) => {
                tracing::warn!(worker = %join.worker_id, ?remote, %status, "refused a worker");
                return Err(status);
            }
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let why = loop {
                match incoming.next().await {
                    Some(Ok(pb::WorkerMessage {
                        kind: Some(pb::worker_message::Kind::Heartbeat(_)),
                    })) => shared.lock().seen(session, Instant::now()),
                    Some(Ok(_)) => break "it sent a message other than a heartbeat".to_string(),
                    Some(Err(status)) => break format!("its session broke: {}", status.message()),
                    None => break "it closed its session".to_string(),
                }
            };
            shared.apply(|run, now| ((), run.left(session, &why, now)));
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            commands,
        ))))
    }

    async fn report(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        Caller::check_session(&request, request.get_ref().session)?;
        let report = request.into_inner();
        self.shared.try_apply(|run, _| run.report(report))?;
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn save_checkpoint(
        &self,
        request: Request<pb::CheckpointUpload>,
    ) -> Result<Response<pb::CheckpointAck>, Status> {
        Caller::check_session(&request, request.get_ref().session)?;
        let upload = request.into_inner();
        let kind = self.shared.lock().check_upload(&upload)?;
        let files: Files = upload.files.into_iter().map(|f| (f.name, f.data)).collect();
        let (step, persist) = match kind {
            Upload::Periodic(step) => (step, true),
            Upload::Handover { step, persist } => (step, persist),
        };
        if persist {
            let store = self.store.clone();
            let written = files.clone();
            let saved = tokio::task::spawn_blocking(move || store.save_checkpoint(step, &written))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            if let Err(e) = saved {
                let reason = format!("cannot save the checkpoint of step {step}: {e}");
                self.shared.fail(reason.clone());
                return Err(Status::internal(reason));
            }
            self.shared.apply(|run, _| ((), run.saved(step)));
        }
        if let Upload::Handover { .. } = kind {
            self.shared
                .apply(|run, now| ((), run.handed_over(step, files, now)));
        }
        Ok(Response::new(pb::CheckpointAck {}))
    }

    async fn halt(&self, request: Request<pb::Halted>) -> Result<Response<pb::HaltAck>, Status> {
        Caller::check_session(&request, request.get_ref().session)?;
        let halted = request.into_inner();
        self.shared.try_apply(|run, now| run.halted(&halted, now))?;
        Ok(Response::new(pb::HaltAck {}))
    }

    async fn fail(
        &self,
        request: Request<pb::Failure>,
    ) -> Result<Response<pb::FailureAck>, Status> {
        Caller::check_session(&request, request.get_ref().session)?;
        let failure = request.into_inner();
        self.shared
            .try_apply(|run, _| run.worker_failed(failure.session, &failure.reason))?;
        Ok(Response::new(pb::FailureAck {}))
    }
}

/// A coordinator listening on its address, ready to run.
pub struct Coordinator {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    store: Arc<dyn RunStore>,
    tasks: std_mpsc::Receiver<Task>,
    settings: Settings,
    secret: Secret,
}

impl Coordinator {
    /// Listens on `listen` (port 0: any free port) for the run described by `settings`.
    pub fn bind(
        listen: SocketAddr,
        settings: Settings,
        store: Arc<dyn RunStore>,
    ) -> Result<Self, CoordinatorError> {
        if settings.workers == 0
            || settings.min_workers == 0
            || settings.min_workers > settings.workers
            || settings.start_step > settings.stop_step
        {
            return Err(CoordinatorError::Invalid(format!(
                "workers {}, min_workers {}, steps {}..{}: expected 1 ≤ min_workers ≤ workers and start ≤ stop",
                settings.workers, settings.min_workers, settings.start_step, settings.stop_step
            )));
        }
        if !crate::valid_token(&settings.token) {
            return Err(CoordinatorError::Invalid(format!(
                "the run token (--token, ELBO_TOKEN): expected at most {} printable ASCII characters without spaces",
                crate::MAX_TOKEN
            )));
        }
        let serve_err = |message: String| CoordinatorError::Serve {
            addr: listen.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("elbo-coordinator")
            .enable_all()
            .build()
            .map_err(|e| serve_err(e.to_string()))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| serve_err(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| serve_err(e.to_string()))?;
        let secret = Secret::random().map_err(CoordinatorError::Invalid)?;
        let (queue, tasks) = std_mpsc::channel();
        let shared = Arc::new(Shared {
            run: Mutex::new(Run::new(settings.clone(), secret.clone(), Instant::now())),
            tasks: Mutex::new(queue),
            changed: Notify::new(),
        });
        Ok(Coordinator {
            runtime,
            listener,
            addr,
            shared,
            store,
            tasks,
            settings,
            secret,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that fails the run from another thread.
    pub fn aborter(&self) -> Aborter {
        Aborter(self.shared.clone())
    }

    /// Serves until the run finishes or fails.
    pub fn run(self) -> Result<Summary, CoordinatorError> {
        let Coordinator {
            runtime,
            listener,
            addr,
            shared,
            store,
            tasks,
            settings,
            secret,
        } = self;
        let effects = {
            let (store, shared) = (store.clone(), shared.clone());
            std::thread::Builder::new()
                .name("elbo-coordinator-effects".into())
                .spawn(move || carry_out(tasks, store, shared))
                .map_err(|e| CoordinatorError::Invalid(e.to_string()))?
        };
        let service = Gate::new(
            CoordinatorServer::new(Service {
                shared: shared.clone(),
                store,
            })
            .max_decoding_message_size(settings.max_message_bytes),
            settings.token.clone(),
            secret,
        );
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(elbo_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &settings.tls {
            builder = builder
                .tls_config(tls.server())
                .map_err(|e| CoordinatorError::Invalid(format!("TLS: {e:?}")))?;
        }
        let server = builder
            .tcp_nodelay(true)
            .add_service(health)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        let server = runtime.spawn(server);
        runtime.block_on(async {
            health_reporter
                .set_serving::<CoordinatorServer<Service>>()
                .await;
        });
        tracing::info!(%addr, run = %settings.run_id, workers = settings.workers, "coordinator listening");
        runtime.block_on(drive(&shared, &settings));
        shared.flush();
        let (phase, summary) = {
            let run = shared.lock();
            (run.phase.clone(), run.summary())
        };
        // Let the last commands reach the workers, then end their streams and the server.
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            shared.queue(Task::Shutdown);
            let _ = stop_server.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        });
        let _ = effects.join();
        runtime.shutdown_timeout(Duration::from_secs(1));
        match phase {
            Phase::Finished => Ok(summary),
            Phase::Failed(reason) => Err(CoordinatorError::Failed(reason)),
            other => Err(CoordinatorError::Failed(format!(
                "the coordinator stopped in phase {other:?}"
            ))),
        }
    }
}

/// Feeds the state machine the passage of time (rendezvous, heartbeats, deadlines) until the
/// run ends.
async fn drive(shared: &Shared, s: &Settings) {
    let tick = (s.heartbeat_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        if shared.apply(|run, now| {
            let fx = run.tick(now);
            (run.ended(), fx)
        }) {
            return;
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
