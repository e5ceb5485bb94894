//! The gRPC face of the coordinator: the `Coordinator` service, grpc.health.v1 and server
//! reflection, and the driver that runs the rendezvous and watches the run until it ends.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use elbo_proto::v1 as pb;
use elbo_proto::v1::coordinator_server::{self, CoordinatorServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::state::{Phase, Shared, Upload};
use crate::{Aborter, CoordinatorError, Files, RunStore, Settings, Summary};

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
        let kind = self.shared.check_upload(&upload)?;
        let files: Files = upload.files.into_iter().map(|f| (f.name, f.data)).collect();
        let (step, persist) = match kind {
            Upload::Periodic(step) => (step, true),
            Upload::Handover { step, persist } => (step, persist),
        };
        if persist {
            let store = self.shared.store.clone();
            let written = files.clone();
            let saved = tokio::task::spawn_blocking(move || store.save_checkpoint(step, &written))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            if let Err(e) = saved {
                let reason = format!("cannot save the checkpoint of step {step}: {e}");
                self.shared.fail(reason.clone());
                return Err(Status::internal(reason));
            }
            self.shared.saved(step);
        }
        if let Upload::Handover { .. } = kind {
            self.shared.handed_over(step, files);
        }
        Ok(Response::new(pb::CheckpointAck {}))
    }

    async fn halt(&self, request: Request<pb::Halted>) -> Result<Response<pb::HaltAck>, Status> {
        self.shared.halted(&request.into_inner())?;
        Ok(Response::new(pb::HaltAck {}))
    }

    async fn fail(
        &self,
        request: Request<pb::Failure>,
    ) -> Result<Response<pb::FailureAck>, Status> {
        let failure = request.into_inner();
        self.shared
            .worker_failed(failure.session, &failure.reason)?;
        Ok(Response::new(pb::FailureAck {}))
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

/// Runs the rendezvous and watches heartbeats and deadlines until the run ends.
async fn drive(shared: &Shared) {
    let s = &shared.settings;
    let tick = (s.heartbeat_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        let phase = shared.lock().phase.clone();
        match phase {
            Phase::Finished | Phase::Failed(_) => return,
            Phase::Rendezvous => shared.rendezvous(),
            Phase::Running | Phase::Halting | Phase::Handover => {}
        }
        for (session, why) in shared.overdue() {
            shared.left(session, &why);
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
