//! The ring all-reduce's transport between worker processes: each worker serves `Peer.Ring` (and
//! grpc.health.v1, for probes) and,
//! for each generation of the ring, streams its chunks to the next rank over one long-lived gRPC
//! stream (so chunks pipeline); chunks from the previous rank arrive through this worker's
//! server. Payloads travel as raw little-endian f32 bytes.
//!
//! An incoming stream is admitted only for the generation this worker is in (a stream that
//! arrives before this worker has joined that generation waits for it, briefly); a stream of a
//! stale generation is refused with `FailedPrecondition` and never reaches the ring. A
//! malformed chunk (a payload that is not whole f32s, an unknown phase, a sender other than the
//! previous rank) is answered with `InvalidArgument`, never forwarded, and reported to the
//! waiting ring at once; an oversized message is refused by the decoder's size limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elbo_proto::v1 as pb;
use elbo_proto::v1::peer_client::PeerClient;
use elbo_proto::v1::peer_server::{Peer, PeerServer};
use tokio::sync::{mpsc as tokio_mpsc, watch};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Result, WorkerError};
use crate::ring::{Chunk, Payload, Phase, RingTransport};

/// Largest HTTP/2 frame this worker accepts: a whole chunk in a few frames, not hundreds of 16 KiB
/// ones.
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// HTTP/2 flow-control window of ring streams and connections: hyper's 64 KiB default would
/// stall the sender several times per chunk; 8 MiB keeps many chunks in flight while earlier
/// ones are summed.
const WINDOW_BYTES: u32 = 8 << 20;

/// How long an incoming stream waits for this worker to join the stream's generation.
const ADMIT_WAIT: Duration = Duration::from_secs(30);

/// How long a closing rank waits for its last chunks to reach the next rank.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

type Inbox = mpsc::Sender<Result<Chunk<LeBytes>>>;

/// Values as they arrived: little-endian f32 bytes, sliced out of the receive buffer. Summed
/// and copied straight from there, so a chunk costs no allocation on the receiving side.
#[derive(Debug, Clone)]
pub struct LeBytes(bytes::Bytes);

impl Payload for LeBytes {
    fn len(&self) -> usize {
        self.0.len() / 4
    }
    fn add_into(&self, acc: &mut [f32]) {
        for (a, b) in acc.iter_mut().zip(self.0.chunks_exact(4)) {
            *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    fn copy_into(&self, dst: &mut [f32]) {
        for (d, b) in dst.iter_mut().zip(self.0.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// What the server admits: one generation, from one previous rank, into one inbox.
#[derive(Clone)]
struct Admit {
    generation: u64,
    prev_rank: u32,
    inbox: Option<Inbox>,
}

struct PeerService {
    admit: watch::Receiver<Admit>,
}

/// Values as little-endian bytes.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(values).to_vec()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

fn to_chunk(m: pb::Chunk, admit: &Admit) -> Result<Chunk<LeBytes>, Status> {
    if m.generation != admit.generation {
        return Err(Status::failed_precondition(format!(
            "chunk of generation {}, but this rank is in generation {}",
            m.generation, admit.generation
        )));
    }
    if m.from_rank != admit.prev_rank {
        return Err(Status::invalid_argument(format!(
            "chunk from rank {}, but this rank's ring predecessor is rank {}",
            m.from_rank, admit.prev_rank
        )));
    }
    if m.data.len() % 4 != 0 {
        return Err(Status::invalid_argument(format!(
            "chunk payload of {} bytes is not whole f32 values",
            m.data.len()
        )));
    }
    let phase = match pb::Phase::try_from(m.phase) {
        Ok(pb::Phase::ReduceScatter) => Phase::ReduceScatter,
        Ok(pb::Phase::AllGather) => Phase::AllGather,
        _ => {
            return Err(Status::invalid_argument(format!(
                "chunk phase {} is not a ring phase",
                m.phase
            )))
        }
    };
    Ok(Chunk {
        generation: m.generation,
        step: m.step,
        phase,
        round: m.round,
        index: m.index,
        data: LeBytes(m.data),
    })
}

impl PeerService {
    /// Waits until this worker has joined `generation` (or a later one) and returns what it
    /// admits then.
    async fn admit(&self, generation: u64) -> Result<Admit, Status> {
        let mut rx = self.admit.clone();
        let admit = tokio::time::timeout(ADMIT_WAIT, rx.wait_for(|a| a.generation >= generation))
            .await
            .map_err(|_| {
                Status::failed_precondition(format!(
                    "this worker did not join generation {generation} within {ADMIT_WAIT:?}"
                ))
            })?
            .map_err(|_| Status::unavailable("this worker is shutting down"))?
            .clone();
        if admit.generation != generation || admit.inbox.is_none() {
            tracing::warn!(
                generation,
                current = admit.generation,
                "refused a ring stream of a stale generation"
            );
            return Err(Status::failed_precondition(format!(
                "stream of stale generation {generation}: this worker is in generation {}",
                admit.generation
            )));
        }
        Ok(admit)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ring(
        &self,
        request: Request<Streaming<pb::Chunk>>,
    ) -> Result<Response<pb::RingAck>, Status> {
        let mut stream = request.into_inner();
        let Some(first) = stream.next().await else {
            return Ok(Response::new(pb::RingAck {}));
        };
        let first = first?;
        let admit = self.admit(first.generation).await?;
        let inbox = admit
            .inbox
            .clone()
            .expect("admitted generations have an inbox");
        let mut next = Some(Ok(first));
        while let Some(message) = match next.take() {
            Some(m) => Some(m),
            None => stream.next().await,
        } {
            let message = match message {
                Ok(m) => m,
                Err(status) => {
                    let reason = format!("the previous rank's stream failed: {}", status.message());
                    let _ = inbox.send(Err(WorkerError::Ring(reason)));
                    return Err(status);
                }
            };
            match to_chunk(message, &admit) {
                Ok(chunk) => {
                    if inbox.send(Ok(chunk)).is_err() {
                        return Err(Status::unavailable("this rank's ring is closed"));
                    }
                }
                Err(status) => {
                    tracing::warn!(%status, "rejected a ring chunk");
                    let _ = inbox.send(Err(WorkerError::Ring(format!(
                        "rejected a chunk from the previous rank: {}",
                        status.message()
                    ))));
                    return Err(status);
                }
            }
        }
        Ok(Response::new(pb::RingAck {}))
    }
}

/// A worker's peer server: listening, ready to join generations of the ring.
pub struct BoundPeer {
    runtime: Arc<tokio::runtime::Runtime>,
    addr: SocketAddr,
    admit: watch::Sender<Admit>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

fn runtime_error(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Invalid(format!("ring peer: {e}"))
}

impl BoundPeer {
    /// Serves `Peer` on `listen` (port 0: any free port), refusing messages larger than a chunk
    /// of `max_chunk_values` f32s.
    pub fn bind(listen: SocketAddr, max_chunk_values: usize) -> Result<Self> {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("elbo-peer")
                .enable_all()
                .build()
                .map_err(runtime_error)?,
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| runtime_error(format!("cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr().map_err(runtime_error)?;
        let (admit, admit_rx) = watch::channel(Admit {
            generation: 0,
            prev_rank: 0,
            inbox: None,
        });
        let service = PeerServer::new(PeerService { admit: admit_rx })
            .max_decoding_message_size(max_chunk_values.saturating_mul(4) + 1024);
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpListenerStream::new(listener);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        runtime.block_on(health_reporter.set_serving::<PeerServer<PeerService>>());
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(WINDOW_BYTES)
            .initial_connection_window_size(WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            });
        runtime.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "ring peer server stopped");
            }
        });
        Ok(BoundPeer {
            runtime,
            addr,
            admit,
            shutdown: Some(shutdown),
        })
    }

    /// The address the peer server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The runtime the server and the ring streams run on; the worker's other gRPC traffic (its
    /// session with the coordinator) shares it.
    pub fn runtime(&self) -> Arc<tokio::runtime::Runtime> {
        self.runtime.clone()
    }

    /// Joins generation `generation` of the ring as `rank` of `world`: from now on only that
    /// generation's chunks from the previous rank are admitted, and this rank's chunks stream to
    /// the next rank at `next` (connecting with retries until `deadline`). Setting `cancel`
    /// aborts the connection attempts and any wait of the returned ring at once.
    pub fn connect(
        &self,
        generation: u64,
        rank: usize,
        world: usize,
        next: SocketAddr,
        deadline: Instant,
        cancel: Arc<AtomicBool>,
    ) -> Result<GrpcRing> {
        let current = self.admit.borrow().generation;
        if world == 0 || rank >= world || generation <= current {
            return Err(WorkerError::Invalid(format!(
                "ring peer: cannot join generation {generation} as rank {rank} of {world} (rank must be inside the world, the generation newer than {current})"
            )));
        }
        let (tx, inbox) = mpsc::channel();
        self.admit.send_replace(Admit {
            generation,
            prev_rank: ((rank + world - 1) % world) as u32,
            inbox: Some(tx),
        });
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let (to_next, sender) = if world > 1 {
            let client = self
                .runtime
                .block_on(connect_client(next, deadline, &cancel))?;
            let (to_next, outgoing) = tokio_mpsc::unbounded_channel::<pb::Chunk>();
            let failed = failure.clone();
            let sender = self.runtime.spawn(async move {
                let mut client = client;
                if let Err(status) = client.ring(UnboundedReceiverStream::new(outgoing)).await {
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(status.message().to_string());
                    }
                }
            });
            (Some(to_next), Some(sender))
        } else {
            (None, None)
        };
        Ok(GrpcRing {
            rank,
            world,
            runtime: self.runtime.clone(),
            to_next,
            sender,
            inbox,
            failure,
            cancel,
            broken: false,
        })
    }
}

fn cancelled() -> WorkerError {
    WorkerError::Ring("aborted: the coordinator ended the generation".into())
}

async fn connect_client(
    next: SocketAddr,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<PeerClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{next}"))
        .map_err(runtime_error)?
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES);
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(PeerClient::new(channel).max_encoding_message_size(usize::MAX))
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(WorkerError::Ring(format!(
                    "cannot reach the next rank at {next}: {e}"
                )))
            }
            Err(_) if cancel.load(Ordering::Relaxed) => return Err(cancelled()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

impl Drop for BoundPeer {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

/// One rank of one generation of the ring: a [`RingTransport`] over gRPC.
pub struct GrpcRing {
    rank: usize,
    world: usize,
    runtime: Arc<tokio::runtime::Runtime>,
    to_next: Option<tokio_mpsc::UnboundedSender<pb::Chunk>>,
    sender: Option<tokio::task::JoinHandle<()>>,
    inbox: mpsc::Receiver<Result<Chunk<LeBytes>>>,
    failure: Arc<Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    /// A send or receive failed: the generation is over, nothing left to flush.
    broken: bool,
}

/// How often a waiting ring checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(2);

impl Drop for GrpcRing {
    /// Ends the stream to the next rank and waits (at most [`FLUSH_TIMEOUT`]) until everything
    /// sent has been delivered, so a rank that finishes first does not cut off its last chunks.
    /// An aborted or broken ring is dropped at once: the next rank may be gone or stalled.
    fn drop(&mut self) {
        self.to_next.take();
        if self.broken || self.cancel.load(Ordering::Relaxed) {
            if let Some(sender) = self.sender.take() {
                sender.abort();
            }
            return;
        }
        if let Some(sender) = self.sender.take() {
            let flushed = self
                .runtime
                .block_on(async { tokio::time::timeout(FLUSH_TIMEOUT, sender).await });
            if flushed.is_err() {
                tracing::warn!(
                    rank = self.rank,
                    "the stream to the next rank did not finish in time"
                );
            }
        }
    }
}

impl RingTransport for GrpcRing {
    type Payload = LeBytes;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&mut self, chunk: Chunk<&[f32]>) -> Result<()> {
        if let Some(reason) = self.failure.lock().ok().and_then(|f| f.clone()) {
            self.broken = true;
            return Err(WorkerError::Ring(format!(
                "the stream to the next rank failed: {reason}"
            )));
        }
        let message = pb::Chunk {
            generation: chunk.generation,
            step: chunk.step,
            phase: match chunk.phase {
                Phase::ReduceScatter => pb::Phase::ReduceScatter,
                Phase::AllGather => pb::Phase::AllGather,
            } as i32,
            round: chunk.round,
            index: chunk.index,
            data: f32_to_le_bytes(chunk.data).into(),
            from_rank: self.rank as u32,
        };
        self.to_next
            .as_ref()
            .map_or(Err(()), |t| t.send(message).map_err(|_| ()))
            .map_err(|()| {
                self.broken = true;
                WorkerError::Ring("the stream to the next rank is closed".into())
            })
    }

    fn recv(&mut self, deadline: Instant) -> Result<Chunk<LeBytes>> {
        let got = self.wait(deadline);
        if got.is_err() {
            self.broken = true;
        }
        got
    }
}

impl GrpcRing {
    fn wait(&mut self, deadline: Instant) -> Result<Chunk<LeBytes>> {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(left.min(CANCEL_POLL)) {
                Ok(chunk) => return chunk,
                Err(mpsc::RecvTimeoutError::Timeout) if left > CANCEL_POLL => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(WorkerError::Ring(
                        "deadline passed waiting for a chunk from the previous rank (cluster.step_timeout_s)"
                            .into(),
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(WorkerError::Ring(
                        "the previous rank's stream closed".into(),
                    ))
                }
            }
        }
    }
}
