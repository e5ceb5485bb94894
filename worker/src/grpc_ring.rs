//! The ring all-reduce's transport between worker processes: each worker serves `Peer.Ring` (and
//! grpc.health.v1, for probes) and, for each generation of the ring, streams its chunks to the
//! next rank over one long-lived gRPC stream (so chunks pipeline); chunks from the previous rank
//! arrive through this worker's server (`peer_server`). Payloads travel as raw
//! little-endian f32 bytes, framed by hand (`ring_wire`): values (or a partial sum)
//! are written once, straight into the outgoing message; a forwarded chunk is not copied at all,
//! and nothing is copied on receipt before the sum.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use elbo_proto::auth::{self, Key};
use elbo_proto::tls::Tls;
use elbo_proto::v1 as pb;
use http_body_util::BodyExt;
use tokio::sync::{mpsc as tokio_mpsc, watch};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{chain, handshake_failed, Result, WorkerError};
use crate::peer_server::{ring_path, Admit, LeBytes, Link, RingService};
use crate::ring::{Chunk, Outgoing, Phase, RingAllReduce, RingSettings, RingTransport};
use crate::ring_wire::{encode_chunk, encode_forward, encode_sum};
use crate::trainer::Reduce;

/// Largest HTTP/2 frame this worker accepts: a whole chunk in a few frames, not hundreds of 16 KiB
/// ones.
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// HTTP/2 flow-control window of ring streams and connections: hyper's 64 KiB default would
/// stall the sender several times per chunk; 8 MiB keeps many chunks in flight while earlier
/// ones are summed.
const WINDOW_BYTES: u32 = 8 << 20;

/// How long a closing rank waits for its last chunks to reach the next rank.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker's peer server: listening, ready to join generations of the ring.
pub struct BoundPeer {
    runtime: Arc<tokio::runtime::Runtime>,
    addr: SocketAddr,
    tls: Option<Tls>,
    admit: watch::Sender<Admit>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    driver: Option<Driver>,
}

/// The thread that drives the peer runtime: every task of it (the server, the ring streams,
/// the all-reduce itself, the session with the coordinator) runs there, one after another, so
/// handing a chunk from the network to the sum never wakes another thread.
struct Driver {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Driver {
    fn start(runtime: Arc<tokio::runtime::Runtime>) -> Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("elbo-peer".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(runtime_error)?;
        Ok(Driver { stop, thread })
    }

    /// Stops driving; whoever blocks on the runtime afterwards drives it while they wait.
    fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.thread().id() != std::thread::current().id() {
            let _ = self.thread.join();
        }
    }
}

fn runtime_error(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Invalid(format!("ring peer: {e}"))
}

impl BoundPeer {
    /// Serves `Peer` on `listen` (port 0: any free port), refusing messages larger than a chunk
    /// of `max_chunk_values` f32s; with `tls`, serves and dials the ring over TLS only.
    pub fn bind(listen: SocketAddr, max_chunk_values: usize, tls: Option<Tls>) -> Result<Self> {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(runtime_error)?,
        );
        let driver = Driver::start(runtime.clone())?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| runtime_error(format!("cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr().map_err(runtime_error)?;
        let (admit, admit_rx) = watch::channel(Admit {
            generation: 0,
            link: None,
        });
        // A chunk's values plus its header fields (a few dozen bytes; 1 KiB of room).
        let service = RingService::new(admit_rx, max_chunk_values.saturating_mul(4) + 1024);
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpListenerStream::new(listener);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        runtime.block_on(health_reporter.set_serving::<RingService>());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder
                .tls_config(tls.server())
                .map_err(|e| runtime_error(format!("TLS: {e:?}")))?;
        }
        let server = builder
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
            tls,
            admit,
            shutdown: Some(shutdown),
            driver: Some(driver),
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
    /// generation's chunks from the previous rank are admitted, on one stream authenticated with
    /// the generation's ring `key`, and this rank's chunks stream to the next rank at `next`
    /// (connecting with retries until `deadline`). Setting `cancel` aborts the connection
    /// attempts and any wait of the returned ring at once.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &self,
        generation: u64,
        rank: usize,
        world: usize,
        key: &Key,
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
        let (tx, inbox) = tokio_mpsc::unbounded_channel();
        self.admit.send_replace(Admit {
            generation,
            link: Some(Link {
                rank: rank as u32,
                prev_rank: ((rank + world - 1) % world) as u32,
                key: key.clone(),
                inbox: tx,
                claimed: Arc::new(AtomicBool::new(false)),
            }),
        });
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let (to_next, sender) = if world > 1 {
            let channel = self.runtime.block_on(connect_channel(
                next,
                self.tls.as_ref(),
                deadline,
                &cancel,
            ))?;
            let (to_next, outgoing) = tokio_mpsc::unbounded_channel::<Bytes>();
            let failed = failure.clone();
            let tag = key.link_tag(generation, rank as u32, ((rank + 1) % world) as u32);
            let sender = self.runtime.spawn(async move {
                if let Err(status) = stream_to_next(channel, generation, &tag, outgoing).await {
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

async fn connect_channel(
    next: SocketAddr,
    tls: Option<&Tls>,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{next}")).map_err(runtime_error)?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client(&next.ip().to_string()))
            .map_err(|e| runtime_error(format!("TLS to {next}: {e:?}")))?;
    }
    let endpoint = endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            // A certificate that does not fit stays so: a misconfigured run, not a lost peer.
            Err(e) if handshake_failed(&e) => {
                return Err(WorkerError::Invalid(format!(
                    "TLS with the next rank at {next} failed: {}",
                    chain(&e)
                )))
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

/// Streams `outgoing` (gRPC-framed chunks) to the next rank as one `Peer.Ring` call of
/// `generation`, authenticated with the link's `tag`, and returns how the call ended. The
/// messages go to HTTP/2 as they are: no re-encoding, no copy.
async fn stream_to_next(
    mut channel: Channel,
    generation: u64,
    tag: &Key,
    outgoing: tokio_mpsc::UnboundedReceiver<Bytes>,
) -> Result<(), Status> {
    use tower_service::Service;
    let frames = UnboundedReceiverStream::new(outgoing)
        .map(|message| Ok::<_, std::convert::Infallible>(http_body::Frame::data(message)));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(ring_path())
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(auth::GENERATION, generation)
        .header(auth::AUTHORIZATION, auth::bearer(&tag.to_hex()))
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .map_err(|e| Status::internal(format!("cannot build the ring request: {e}")))?;
    let unreachable = |e: tonic::transport::Error| {
        Status::unavailable(format!("the next rank is unreachable: {e}"))
    };
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(unreachable)?;
    let response = channel.call(request).await.map_err(unreachable)?;
    if let Some(status) = grpc_status(response.headers()) {
        return status;
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "the next rank answered HTTP {}",
            response.status()
        )));
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(trailers) = frame?.into_trailers() {
            return grpc_status(&trailers).unwrap_or_else(|| {
                Err(Status::unknown("the next rank's answer has no grpc-status"))
            });
        }
    }
    Err(Status::unknown(
        "the next rank's answer ended without a grpc-status",
    ))
}

/// The call's outcome from `grpc-status` and `grpc-message`, if `headers` carry one. Not
/// tonic's `Status::from_header_map`: that panics on a malformed `grpc-status-details-bin`,
/// which a peer controls.
fn grpc_status(headers: &http::HeaderMap) -> Option<Result<(), Status>> {
    let code = Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    if code == Code::Ok {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(Err(Status::new(code, message)))
}

impl Drop for BoundPeer {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(driver) = self.driver.take() {
            driver.stop();
        }
    }
}

/// One rank of one generation of the ring: a [`RingTransport`] over gRPC.
pub struct GrpcRing {
    rank: usize,
    world: usize,
    runtime: Arc<tokio::runtime::Runtime>,
    to_next: Option<tokio_mpsc::UnboundedSender<Bytes>>,
    sender: Option<tokio::task::JoinHandle<()>>,
    inbox: tokio_mpsc::UnboundedReceiver<Result<Chunk<LeBytes>>>,
    failure: Arc<Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    /// A send or receive failed: the generation is over, nothing left to flush.
    broken: bool,
}

/// How often a waiting ring checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(2);

/// How long a receive polls for a chunk before it sleeps (see [`GrpcRing::wait`]). Measured
/// with `elbo bench allreduce` on 2 cores (25 MB, medians of interleaved runs): 4 ranks reach
/// 1.3 GB/s without polling and 1.8–2.0 GB/s with 50–1000 µs of it; at 2 ranks the runs with
/// polling ranged from equal to 15 % slower, within this machine's run-to-run noise.
const SPIN_FOR: Duration = Duration::from_micros(200);

impl Drop for GrpcRing {
    /// Ends the stream to the next rank and waits (at most `FLUSH_TIMEOUT`) until everything
    /// sent has been delivered, so a rank that finishes first does not cut off its last chunks.
    /// An aborted or broken ring is dropped at once: the next rank may be gone or stalled.
    fn drop(&mut self) {
        self.to_next.take();
        // Dropped on the runtime's own thread (a failed all-reduce task) it cannot wait there.
        let on_runtime = tokio::runtime::Handle::try_current().is_ok();
        if self.broken || on_runtime || self.cancel.load(Ordering::Relaxed) {
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

    fn send(&mut self, chunk: Chunk<Outgoing<'_, LeBytes>>) -> Result<()> {
        if let Some(reason) = self.failure.lock().ok().and_then(|f| f.clone()) {
            self.broken = true;
            return Err(WorkerError::Ring(format!(
                "the stream to the next rank failed: {reason}"
            )));
        }
        let header = pb::Chunk {
            generation: chunk.generation,
            step: chunk.step,
            phase: match chunk.phase {
                Phase::ReduceScatter => pb::Phase::ReduceScatter,
                Phase::AllGather => pb::Phase::AllGather,
            } as i32,
            round: chunk.round,
            index: chunk.index,
            data: Bytes::new(),
            from_rank: self.rank as u32,
        };
        let framed = match chunk.data {
            Outgoing::Values(values) => encode_chunk(&header, values).map(|m| [m, Bytes::new()]),
            Outgoing::Sum(own, received) => {
                encode_sum(&header, own, received.bytes()).map(|m| [m, Bytes::new()])
            }
            Outgoing::Forward(received) => encode_forward(&header, received.into_bytes()),
        };
        let framed = framed.map_err(|status| {
            self.broken = true;
            WorkerError::Ring(status.message().to_string())
        })?;
        for part in framed.into_iter().filter(|part| !part.is_empty()) {
            self.to_next
                .as_ref()
                .map_or(Err(()), |t| t.send(part).map_err(|_| ()))
                .map_err(|()| {
                    self.broken = true;
                    WorkerError::Ring("the stream to the next rank is closed".into())
                })?;
        }
        Ok(())
    }

    async fn recv(&mut self, deadline: Instant) -> Result<Chunk<LeBytes>> {
        let got = self.wait(deadline).await;
        if got.is_err() {
            self.broken = true;
        }
        got
    }
}

impl GrpcRing {
    /// The next chunk from the previous rank. A chunk is usually on its way: the wait first
    /// polls (letting this thread's network I/O and other processes run in between) before it
    /// sleeps, since on a busy machine waking a sleeping thread costs more than the poll.
    async fn wait(&mut self, deadline: Instant) -> Result<Chunk<LeBytes>> {
        let started = Instant::now();
        while started.elapsed() < SPIN_FOR {
            match self.inbox.try_recv() {
                Ok(chunk) => return chunk,
                Err(tokio_mpsc::error::TryRecvError::Empty) => {
                    std::thread::yield_now();
                    tokio::task::yield_now().await;
                }
                Err(tokio_mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(CANCEL_POLL), self.inbox.recv()).await {
                Ok(Some(chunk)) => return chunk,
                Ok(None) => {
                    return Err(WorkerError::Ring(
                        "the previous rank's stream closed".into(),
                    ))
                }
                Err(_) if left > CANCEL_POLL => {}
                Err(_) => {
                    return Err(WorkerError::Ring(
                        "deadline passed waiting for a chunk from the previous rank (cluster.step_timeout_s)"
                            .into(),
                    ))
                }
            }
        }
    }
}

/// The ring all-reduce of one generation over gRPC, as the trainer's [`Reduce`]: each
/// all-reduce runs on the peer runtime's thread, beside the streams' network I/O, while the
/// calling thread waits for it.
pub struct GrpcAllReduce {
    ring: Option<RingAllReduce<GrpcRing>>,
    runtime: Arc<tokio::runtime::Runtime>,
    world: u32,
}

impl GrpcAllReduce {
    /// All-reduces over `ring` (generation `generation`) as `settings` say.
    pub fn new(ring: GrpcRing, generation: u64, settings: RingSettings) -> Result<Self> {
        let runtime = ring.runtime.clone();
        let world = ring.world as u32;
        Ok(GrpcAllReduce {
            ring: Some(RingAllReduce::new(ring, generation, settings)?),
            runtime,
            world,
        })
    }
}

impl Reduce for GrpcAllReduce {
    fn world(&self) -> u32 {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        let mut ring = self.ring.take().ok_or_else(|| {
            WorkerError::Ring("an earlier all-reduce of this generation did not finish".into())
        })?;
        let mut values = std::mem::take(buf);
        let len = values.len();
        let task = self.runtime.spawn(async move {
            let done = ring.all_reduce_sum(&mut values).await;
            (ring, values, done)
        });
        match self.runtime.block_on(task) {
            Ok((ring, values, done)) => {
                self.ring = Some(ring);
                *buf = values;
                done
            }
            Err(e) => {
                buf.resize(len, 0.0);
                Err(WorkerError::Ring(format!(
                    "the all-reduce task failed: {e}"
                )))
            }
        }
    }
}
