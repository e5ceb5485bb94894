//! The ring all-reduce's transport between worker processes: each rank serves `Peer.Ring` and
//! streams its chunks to the next rank over one long-lived gRPC stream (so chunks pipeline);
//! chunks from the previous rank arrive through this rank's server. Payloads travel as raw
//! little-endian f32 bytes. A malformed chunk (a payload that is not whole f32s, an unknown
//! phase, a sender other than the previous rank) is answered with `InvalidArgument`, never
//! forwarded, and reported to the waiting ring at once; an oversized message is refused by the
//! decoder's size limit.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use elbo_proto::v1 as pb;
use elbo_proto::v1::peer_client::PeerClient;
use elbo_proto::v1::peer_server::{Peer, PeerServer};
use tokio::sync::mpsc as tokio_mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Result, WorkerError};
use crate::ring::{Chunk, Phase, RingTransport};

/// The largest gRPC message a peer accepts (a chunk plus its tags).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

type Inbox = mpsc::Sender<Result<Chunk>>;

struct PeerService {
    prev_rank: u32,
    inbox: Mutex<Inbox>,
}

fn to_chunk(m: pb::Chunk, prev_rank: u32) -> Result<Chunk, Status> {
    if m.from_rank != prev_rank {
        return Err(Status::invalid_argument(format!(
            "chunk from rank {}, but this rank's ring predecessor is rank {prev_rank}",
            m.from_rank
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
    let data = m
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Chunk {
        generation: m.generation,
        step: m.step,
        phase,
        round: m.round,
        index: m.index,
        data,
    })
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ring(
        &self,
        request: Request<Streaming<pb::Chunk>>,
    ) -> Result<Response<pb::RingAck>, Status> {
        let inbox = self
            .inbox
            .lock()
            .map_err(|_| Status::internal("peer inbox lock poisoned"))?
            .clone();
        let mut stream = request.into_inner();
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(m) => m,
                Err(status) => {
                    let reason = format!(
                        "ring peer: the previous rank's stream failed: {}",
                        status.message()
                    );
                    let _ = inbox.send(Err(WorkerError::Invalid(reason)));
                    return Err(status);
                }
            };
            match to_chunk(message, self.prev_rank) {
                Ok(chunk) => {
                    if inbox.send(Ok(chunk)).is_err() {
                        return Err(Status::unavailable("this rank's ring is closed"));
                    }
                }
                Err(status) => {
                    tracing::warn!(%status, "rejected a ring chunk");
                    let _ = inbox.send(Err(WorkerError::Invalid(format!(
                        "ring peer: rejected a chunk: {}",
                        status.message()
                    ))));
                    return Err(status);
                }
            }
        }
        Ok(Response::new(pb::RingAck {}))
    }
}

/// A rank whose peer server is listening, not yet connected to the next rank.
pub struct BoundPeer {
    rank: usize,
    world: usize,
    runtime: Arc<tokio::runtime::Runtime>,
    addr: SocketAddr,
    inbox: mpsc::Receiver<Result<Chunk>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BoundPeer {
    /// Serves `Peer` for rank `rank` of `world` on `listen` (port 0: any free port).
    pub fn bind(rank: usize, world: usize, listen: SocketAddr) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(WorkerError::Invalid(format!(
                "ring peer: rank {rank} is not in a world of {world}"
            )));
        }
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("elbo-peer")
                .enable_all()
                .build()
                .map_err(|e| {
                    WorkerError::Invalid(format!("ring peer: cannot start its runtime: {e}"))
                })?,
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| {
                WorkerError::Invalid(format!("ring peer: cannot listen on {listen}: {e}"))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| WorkerError::Invalid(format!("ring peer: {e}")))?;
        let (tx, inbox) = mpsc::channel();
        let service = PeerService {
            prev_rank: ((rank + world - 1) % world) as u32,
            inbox: Mutex::new(tx),
        };
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(PeerServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop.await;
            });
        runtime.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "ring peer server stopped");
            }
        });
        Ok(BoundPeer {
            rank,
            world,
            runtime,
            addr,
            inbox,
            shutdown: Some(shutdown),
        })
    }

    /// The address the peer server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens the stream to the next rank at `next` (retrying until `deadline`).
    pub fn connect(mut self, next: SocketAddr, deadline: Instant) -> Result<GrpcRing> {
        let endpoint = format!("http://{next}");
        let client = self.runtime.block_on(async {
            loop {
                match PeerClient::connect(endpoint.clone()).await {
                    Ok(c) => return Ok(c),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(WorkerError::Invalid(format!(
                            "ring peer: cannot reach the next rank at {next}: {e}"
                        )))
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })?;
        let mut client = client.max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (to_next, outgoing) = tokio_mpsc::unbounded_channel::<pb::Chunk>();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let failed = failure.clone();
        let sender = self.runtime.spawn(async move {
            let stream: Pin<Box<UnboundedReceiverStream<pb::Chunk>>> =
                Box::pin(UnboundedReceiverStream::new(outgoing));
            if let Err(status) = client.ring(stream).await {
                if let Ok(mut f) = failed.lock() {
                    *f = Some(status.message().to_string());
                }
            }
        });
        Ok(GrpcRing {
            rank: self.rank,
            world: self.world,
            to_next: Some(to_next),
            sender: Some(sender),
            inbox: std::mem::replace(&mut self.inbox, mpsc::channel().1),
            failure,
            _peer: self,
        })
    }
}

impl Drop for BoundPeer {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

/// A connected rank: a [`RingTransport`] over gRPC.
pub struct GrpcRing {
    rank: usize,
    world: usize,
    to_next: Option<tokio_mpsc::UnboundedSender<pb::Chunk>>,
    sender: Option<tokio::task::JoinHandle<()>>,
    inbox: mpsc::Receiver<Result<Chunk>>,
    failure: Arc<Mutex<Option<String>>>,
    _peer: BoundPeer,
}

/// How long a closing rank waits for its last chunks to reach the next rank.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for GrpcRing {
    /// Ends the stream to the next rank and waits (at most [`FLUSH_TIMEOUT`]) until everything
    /// sent has been delivered, so a rank that finishes first does not cut off its last chunks.
    fn drop(&mut self) {
        self.to_next.take();
        if let Some(sender) = self.sender.take() {
            let flushed = self
                ._peer
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
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&mut self, chunk: Chunk) -> Result<()> {
        if let Some(reason) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Err(WorkerError::Invalid(format!(
                "ring peer: the stream to the next rank failed: {reason}"
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
            data: chunk.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            from_rank: self.rank as u32,
        };
        self.to_next
            .as_ref()
            .map_or(Err(()), |t| t.send(message).map_err(|_| ()))
            .map_err(|()| {
                WorkerError::Invalid("ring peer: the stream to the next rank is closed".into())
            })
    }

    fn recv(&mut self, deadline: Instant) -> Result<Chunk> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.inbox.recv_timeout(wait) {
            Ok(chunk) => chunk,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(WorkerError::Invalid(
                "ring peer: deadline passed waiting for a chunk from the previous rank".into(),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WorkerError::Invalid(
                "ring peer: the previous rank's stream closed".into(),
            )),
        }
    }
}
