//! The gRPC face of the coordinator: the `Coordinator` service, grpc.health.v1 and server
//! reflection, and the driver that runs the rendezvous and watches the run until it ends.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elbo_proto::v1 as pb;
use elbo_proto::v1::coordinator_server::{self, CoordinatorServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::state::{Phase, Shared};
use crate::{Aborter, CoordinatorError, RunStore, Settings, Summary};

/// How long a new session may take to send its `Join`.
const JOIN_WAIT: Duration = Duration::from_secs(10);

struct Service {
    shared: Arc<Shared>,
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
                    })) => shared.seen(session),
                    Some(Ok(_)) => break "it sent a message other than a heartbeat".to_string(),
                    Some(Err(status)) => break format!("its session broke: {}", status.message()),
                    None => break "it closed its session".to_string(),
                }
            };
            shared.left(session, &why);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            commands,
        ))))
    }

    async fn report(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        self.shared.report(request.into_inner())?;
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn save_checkpoint(
        &self,
        request: Request<pb::CheckpointUpload>,
    ) -> Result<Response<pb::CheckpointAck>, Status> {
        let upload = request.into_inner();
        let step = self.shared.check_upload(&upload)?;
        let files = upload.files.into_iter().map(|f| (f.name, f.data)).collect();
        let store = self.shared.store.clone();
        let saved = tokio::task::spawn_blocking(move || store.save_checkpoint(step, &files))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match saved {
            Ok(()) => {
                self.shared.saved(step);
                Ok(Response::new(pb::CheckpointAck {}))
            }
            Err(e) => {
                let reason = format!("cannot save the checkpoint of step {step}: {e}");
                self.shared.fail(reason.clone());
                Err(Status::internal(reason))
            }
        }
    }
}

/// A coordinator listening on its address, ready to run.
pub struct Coordinator {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
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
        Ok(Coordinator {
            runtime,
            listener,
            addr,
            shared: Arc::new(Shared::new(settings, store)),
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
        } = self;
        let max = shared.settings.max_message_bytes;
        let service = CoordinatorServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(max);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(elbo_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
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
        tracing::info!(%addr, run = %shared.settings.run_id, workers = shared.settings.workers, "coordinator listening");
        runtime.block_on(drive(&shared));
        let (phase, summary) = shared.outcome();
        // Let the last commands reach the workers, then end their streams and the server.
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            shared.close_sessions();
            let _ = stop_server.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        });
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

/// Runs the rendezvous, then watches heartbeats until the run ends.
async fn drive(shared: &Shared) {
    let s = &shared.settings;
    let deadline = Instant::now() + s.rendezvous_timeout;
    let tick = (s.heartbeat_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        let (phase, joined) = {
            let inner = shared.lock();
            (inner.phase.clone(), inner.sessions.len() as u32)
        };
        match phase {
            Phase::Finished | Phase::Failed(_) => return,
            Phase::Running => {
                if let Some(reason) = shared.silent() {
                    shared.fail(reason);
                }
            }
            Phase::Rendezvous => {
                let timed_out = Instant::now() >= deadline;
                if joined >= s.workers || (timed_out && joined >= s.min_workers) {
                    if let Err(reason) = shared.start() {
                        shared.fail(reason);
                    }
                } else if timed_out {
                    shared.fail(format!(
                        "only {joined} of at least {} workers (cluster.min_workers) joined within {:.0} s (cluster.rendezvous_timeout_s)",
                        s.min_workers,
                        s.rendezvous_timeout.as_secs_f64()
                    ));
                }
            }
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
