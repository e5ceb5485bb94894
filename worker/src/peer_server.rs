//! The server half of `Peer.Ring`: a hand-written gRPC service (plain gRPC on the wire, see
//! [`crate::ring_wire`]) that admits the stream of the previous rank for this worker's current
//! generation and hands its chunks to the waiting ring without copying their payloads.
//!
//! An incoming stream is admitted only for the generation this worker is in (a stream that
//! arrives before this worker has joined that generation waits for it, briefly), and only with
//! that generation's credentials: its headers must name the generation (`elbo-generation`) and
//! carry the link's tag under the generation's ring key (`authorization: Bearer <hex>`, see
//! [`elbo_proto::auth`]), checked before a byte of the body is read; and only once per
//! generation. A stream of a stale generation is refused with `FailedPrecondition`, one without
//! the credentials with `Unauthenticated`, a second stream of the generation with
//! `AlreadyExists`: each with a log line, none reaching the ring, which goes on. A
//! malformed chunk (not a `Chunk` message, a payload that is not whole f32s, an unknown phase, a
//! sender other than the previous rank) is answered with `InvalidArgument`, never forwarded, and
//! reported to the waiting ring at once; a message larger than a chunk may be is refused with
//! `OutOfRange` before it is buffered.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use elbo_proto::auth::{self, Key};
use elbo_proto::v1 as pb;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

use crate::error::{Result, WorkerError};
use crate::ring::{Chunk, Payload, Phase};
use crate::ring_wire::{le_f32s, MessageReader, PREFIX_BYTES};

/// How long an incoming stream waits for this worker to join the stream's generation.
const ADMIT_WAIT: Duration = Duration::from_secs(30);

/// The gRPC path of the ring stream: `/elbo.v1.Peer/Ring`.
pub fn ring_path() -> String {
    format!("/{}/Ring", pb::peer_server::SERVICE_NAME)
}

/// Where admitted chunks go: the ring of the current generation.
pub type Inbox = tokio::sync::mpsc::UnboundedSender<Result<Chunk<LeBytes>>>;

/// Values as they arrived: little-endian f32 bytes, sliced out of the receive buffer. Summed
/// and copied straight from there, so a chunk costs no copy and no allocation on the receiving
/// side.
#[derive(Debug, Clone)]
pub struct LeBytes(Bytes);

impl LeBytes {
    /// The little-endian f32 bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The little-endian f32 bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Payload for LeBytes {
    fn len(&self) -> usize {
        self.0.len() / 4
    }
    fn add_into(&self, acc: &mut [f32]) {
        acc.iter_mut()
            .zip(le_f32s(&self.0))
            .for_each(|(a, v)| *a += v);
    }
    fn copy_into(&self, dst: &mut [f32]) {
        dst.iter_mut()
            .zip(le_f32s(&self.0))
            .for_each(|(d, v)| *d = v);
    }
}

/// What the server admits: one stream of the generation this worker is in.
#[derive(Clone)]
pub struct Admit {
    /// The generation this worker is in (0 before the first).
    pub generation: u64,
    /// Its place in that generation's ring; `None` before the first generation.
    pub link: Option<Link>,
}

/// This worker's incoming link in a generation's ring: one stream, from the previous rank,
/// holding the generation's key, into one inbox.
#[derive(Clone)]
pub struct Link {
    /// This worker's rank.
    pub rank: u32,
    /// Its ring predecessor.
    pub prev_rank: u32,
    /// The generation's ring key.
    pub key: Key,
    /// The ring waiting for chunks.
    pub inbox: Inbox,
    /// Set once the generation's stream has been admitted.
    pub claimed: Arc<AtomicBool>,
}

/// The generation a ring stream's headers name and the tag they carry, or why they do not.
///
/// # Errors
/// `Unauthenticated`: no `elbo-generation` number, or no bearer credential of 64 hex digits.
pub fn ring_credentials(headers: &http::HeaderMap) -> Result<(u64, Key), Status> {
    let generation = auth::number_of(headers, auth::GENERATION).ok_or_else(|| {
        Status::unauthenticated(format!(
            "a ring stream names its generation in the {} header",
            auth::GENERATION
        ))
    })?;
    let tag = auth::bearer_of(headers)
        .and_then(Key::from_hex)
        .ok_or_else(|| {
            Status::unauthenticated("a ring stream carries its link's tag as a bearer credential")
        })?;
    Ok((generation, tag))
}

/// The `elbo.Peer` service.
#[derive(Clone)]
pub struct RingService {
    admit: watch::Receiver<Admit>,
    max_message: usize,
}

impl NamedService for RingService {
    const NAME: &'static str = pb::peer_server::SERVICE_NAME;
}

impl RingService {
    /// Serves the generations `admit` announces, refusing messages longer than `max_message`
    /// bytes.
    pub fn new(admit: watch::Receiver<Admit>, max_message: usize) -> Self {
        RingService { admit, max_message }
    }

    /// Waits until this worker has joined `generation` (or a later one) and returns its link
    /// in that generation, if it is still in it.
    async fn admit(&self, generation: u64) -> Result<Link, Status> {
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
        match admit.link {
            Some(link) if admit.generation == generation => Ok(link),
            _ => {
                tracing::warn!(
                    generation,
                    current = admit.generation,
                    "refused a ring stream of a stale generation"
                );
                Err(Status::failed_precondition(format!(
                    "stream of stale generation {generation}: this worker is in generation {}",
                    admit.generation
                )))
            }
        }
    }

    /// Admits the stream whose headers are `headers`, or says why not (and logs it): the
    /// generation it names must be this worker's, its tag the one the generation's key gives
    /// the link from the previous rank, and no stream of the generation admitted before.
    async fn authenticate(&self, headers: &http::HeaderMap) -> Result<(u64, Link), Status> {
        let refused = |status: Status| {
            tracing::warn!(%status, "refused a ring stream");
            status
        };
        let (generation, tag) = ring_credentials(headers).map_err(refused)?;
        let link = self.admit(generation).await?;
        let want = link.key.link_tag(generation, link.prev_rank, link.rank);
        if !tag.matches(&want) {
            return Err(refused(Status::unauthenticated(format!(
                "wrong credential for generation {generation}'s ring stream from rank {}",
                link.prev_rank
            ))));
        }
        if link.claimed.swap(true, Ordering::AcqRel) {
            return Err(refused(Status::already_exists(format!(
                "generation {generation}'s ring stream from rank {} is already open",
                link.prev_rank
            ))));
        }
        Ok((generation, link))
    }

    /// Reads the stream to its end, forwarding each chunk to the ring of its generation.
    async fn serve(&self, request: http::Request<Body>) -> Result<(), Status> {
        let (generation, link) = self.authenticate(request.headers()).await?;
        let mut body = request.into_body();
        let mut decoder = ChunkDecoder::new(generation, link.prev_rank, self.max_message);
        let result = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Status::unavailable(format!(
                        "the previous rank's stream failed: {}",
                        e.message()
                    ))
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                decoder.push(data);
                while let Some(chunk) = decoder.next_chunk()? {
                    if link.inbox.send(Ok(chunk)).is_err() {
                        return Err(Status::unavailable("this rank's ring is closed"));
                    }
                }
            }
            decoder.finish()
        }
        .await;
        if let Err(status) = &result {
            let reason = if status.code() == tonic::Code::Unavailable {
                status.message().to_string()
            } else {
                tracing::warn!(%status, "rejected a ring chunk");
                format!(
                    "rejected a chunk from the previous rank: {}",
                    status.message()
                )
            };
            let _ = link.inbox.send(Err(WorkerError::Ring(reason)));
        }
        result
    }
}

/// The answer to a finished stream: an empty `RingAck` and `grpc-status: 0`.
fn ok_response() -> http::Response<Body> {
    // `RingAck` has no fields: its message is a prefix of length 0.
    const EMPTY_ACK: [u8; PREFIX_BYTES] = [0; PREFIX_BYTES];
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        http_body::Frame::data(Bytes::from_static(&EMPTY_ACK)),
        http_body::Frame::trailers(trailers),
    ];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames.map(Ok::<_, Infallible>)));
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl tower_service::Service<http::Request<Body>> for RingService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            let is_grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if !is_grpc {
                let mut response = http::Response::new(Body::empty());
                *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
                return Ok(response);
            }
            if request.uri().path() != ring_path() {
                let path = request.uri().path().to_string();
                return Ok(Status::unimplemented(format!("no method {path} here")).into_http());
            }
            Ok(match service.serve(request).await {
                Ok(()) => ok_response(),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The chunks of one admitted ring stream, cut out of its DATA frames as they arrive: each
/// message must be a `Chunk` of the admitted generation from the ring predecessor, with whole
/// f32 values and a ring phase, and no longer than the limit.
#[derive(Debug)]
pub struct ChunkDecoder {
    reader: MessageReader,
    generation: u64,
    prev_rank: u32,
}

impl ChunkDecoder {
    /// A decoder for the stream `prev_rank` opened in `generation`, refusing messages longer
    /// than `max_message` bytes.
    pub fn new(generation: u64, prev_rank: u32, max_message: usize) -> Self {
        ChunkDecoder {
            reader: MessageReader::new(max_message),
            generation,
            prev_rank,
        }
    }

    /// Appends the stream's next DATA frame.
    pub fn push(&mut self, frame: Bytes) {
        self.reader.push(frame);
    }

    /// The next whole chunk, `None` while it is still incomplete.
    ///
    /// # Errors
    /// A message that is compressed, too long, not a `Chunk`, of another generation or sender,
    /// not whole f32 values or of no ring phase: the stream is broken from then on.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk<LeBytes>>, Status> {
        let Some(message) = self.reader.next_message()? else {
            return Ok(None);
        };
        let message = pb::Chunk::decode(message)
            .map_err(|e| Status::invalid_argument(format!("a ring message is not a Chunk: {e}")))?;
        to_chunk(message, self.generation, self.prev_rank).map(Some)
    }

    /// The stream has ended: fine between messages.
    ///
    /// # Errors
    /// `InvalidArgument` when it ended inside a message.
    pub fn finish(&self) -> Result<(), Status> {
        if self.reader.is_between_messages() {
            Ok(())
        } else {
            Err(Status::invalid_argument(
                "the ring stream ended inside a message",
            ))
        }
    }
}

/// A received message as the ring's chunk, if it belongs to the admitted `generation` and comes
/// from `prev_rank`.
fn to_chunk(m: pb::Chunk, generation: u64, prev_rank: u32) -> Result<Chunk<LeBytes>, Status> {
    if m.generation != generation {
        return Err(Status::failed_precondition(format!(
            "chunk of generation {}, but this rank is in generation {generation}",
            m.generation
        )));
    }
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
    Ok(Chunk {
        generation: m.generation,
        step: m.step,
        phase,
        round: m.round,
        index: m.index,
        data: LeBytes(m.data),
    })
}
