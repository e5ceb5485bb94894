//! The ring all-reduce over gRPC on loopback: correctness, rejection of malformed chunks, and
//! refusal of streams without the generation's credentials.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elbo_proto::auth::{self, Key, Secret};
use elbo_proto::tls::Tls;
use elbo_proto::v1 as pb;
use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce, GrpcRing};
use elbo_worker::ring::RingSettings;
use elbo_worker::Reduce;
use tonic::transport::ClientTlsConfig;

fn settings(chunk_len: usize, timeout: Duration) -> RingSettings {
    RingSettings {
        chunk_len,
        depth: 1,
        timeout,
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The ring key the coordinator of these tests gives generation `generation`.
fn key(generation: u64) -> Key {
    Secret::from_bytes([5; auth::KEY_BYTES]).ring_key(generation)
}

/// `peer` joins `generation` as `rank` of `world`, sending to `next`.
fn join(
    peer: &BoundPeer,
    generation: u64,
    rank: usize,
    world: usize,
    next: SocketAddr,
) -> GrpcRing {
    peer.connect(
        generation,
        rank,
        world,
        &key(generation),
        next,
        Instant::now() + Duration::from_secs(10),
        Default::default(),
    )
    .unwrap()
}

/// Rank 0 of a two-rank ring in a generation, of which the test plays the sending half: it
/// takes rank 1's stream, while its own stream goes to a peer that never joins a generation,
/// so rank 1's incoming link is the test's to open.
struct Rank0 {
    ring: Option<GrpcRing>,
    cancel: Arc<AtomicBool>,
    peer: BoundPeer,
    _sink: BoundPeer,
}

impl Rank0 {
    /// Rank 0 of `generation`.
    fn join(generation: u64) -> Rank0 {
        Rank0::join_over(generation, None)
    }

    /// Rank 0 of `generation`, serving (and dialling its sink) over `tls`.
    fn join_over(generation: u64, tls: Option<Tls>) -> Rank0 {
        let sink = BoundPeer::bind(loopback(), 4, tls.clone()).unwrap();
        let peer = BoundPeer::bind(loopback(), 4, tls).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let ring = peer
            .connect(
                generation,
                0,
                2,
                &key(generation),
                sink.local_addr(),
                Instant::now() + Duration::from_secs(10),
                cancel.clone(),
            )
            .unwrap();
        Rank0 {
            ring: Some(ring),
            cancel,
            peer,
            _sink: sink,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.peer.local_addr()
    }
}

impl Drop for Rank0 {
    /// Its stream to the sink never finishes: drop the ring at once.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.ring.take();
    }
}

/// Three ranks on loopback (over `tls`, if given) all-reduce three buffers of 10,001 values
/// (rank r's value i at step s is (i·(r+1) + s)/2): every rank ends with the closed-form sums.
fn three_ranks_sum(tls: Option<Tls>) {
    let world = 3;
    let peers: Vec<BoundPeer> = (0..world)
        .map(|_| BoundPeer::bind(loopback(), 1000, tls.clone()).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = peers.iter().map(BoundPeer::local_addr).collect();
    let handles: Vec<_> = peers
        .into_iter()
        .enumerate()
        .map(|(rank, peer)| {
            let next = addrs[(rank + 1) % world];
            std::thread::spawn(move || {
                let ring = join(&peer, 1, rank, world, next);
                let mut ar =
                    GrpcAllReduce::new(ring, 1, settings(1000, Duration::from_secs(10))).unwrap();
                let mut results = Vec::new();
                for step in 0..3 {
                    let mut buf: Vec<f32> = (0..10_001)
                        .map(|i| (i * (rank + 1) + step) as f32 * 0.5)
                        .collect();
                    ar.all_reduce_sum(&mut buf).unwrap();
                    results.push(buf);
                }
                results
            })
        })
        .collect();
    let results: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (step, got) in results[0].iter().enumerate() {
        for (i, v) in got.iter().enumerate() {
            let want = (0..world)
                .map(|r| (i * (r + 1) + step) as f64 * 0.5)
                .sum::<f64>();
            assert!(
                (f64::from(*v) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{v} vs {want}"
            );
        }
    }
    assert!(
        results.iter().all(|r| r == &results[0]),
        "all ranks identical"
    );
}

#[test]
fn three_ranks_all_reduce_over_grpc() {
    three_ranks_sum(None);
}

#[test]
fn a_malformed_chunk_is_rejected_with_a_status() {
    let peer = BoundPeer::bind(loopback(), 4, None).unwrap();
    let addr = peer.local_addr();
    let rank0 = Rank0::join(1);
    let ring = join(&peer, 1, 1, 2, rank0.addr());
    let bad = pb::Chunk {
        generation: 1,
        from_rank: 0,
        phase: pb::Phase::ReduceScatter as i32,
        data: vec![1, 2, 3, 4, 5].into(),
        ..Default::default()
    };
    let status = send_stream(addr, vec![bad], &link(1, &key(1))).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("5 bytes"), "{}", status.message());
    let mut ar = GrpcAllReduce::new(ring, 1, settings(4, Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let err = ar
        .all_reduce_sum(&mut vec![1.0; 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rejected a chunk"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "reported at once, not at the deadline"
    );
}

/// Call headers: (name, value).
type Headers = Vec<(&'static str, String)>;

/// The headers of generation `generation`'s stream from rank 0 to rank 1, tagged under `key`.
fn link(generation: u64, key: &Key) -> Headers {
    vec![
        (auth::GENERATION, generation.to_string()),
        (
            auth::AUTHORIZATION,
            auth::bearer(&key.link_tag(generation, 0, 1).to_hex()),
        ),
    ]
}

/// Sends `chunks` with `headers` to the peer at `addr` on one stream of a stock gRPC client and
/// returns how the peer answered.
fn send_stream(
    addr: SocketAddr,
    chunks: Vec<pb::Chunk>,
    headers: &[(&'static str, String)],
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(tokio_stream::iter(chunks));
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = pb::peer_client::PeerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client.ring(request).await.map(|_| ())
    })
}

/// A chunk from rank 0 of `values` zeros.
fn zeros(generation: u64, values: usize) -> pb::Chunk {
    pb::Chunk {
        generation,
        from_rank: 0,
        phase: pb::Phase::ReduceScatter as i32,
        data: vec![0; values * 4].into(),
        ..Default::default()
    }
}

/// `peer` joins generation 1 as rank 1 of 2, then generation 2; its rank 0 is the test's.
fn second_generation(peer: &BoundPeer) -> (Rank0, GrpcRing) {
    let next = Rank0::join(2);
    drop(join(peer, 1, 1, 2, next.addr()));
    let ring = join(peer, 2, 1, 2, next.addr());
    (next, ring)
}

#[test]
fn a_stale_generation_is_refused_and_never_summed() {
    let peer = BoundPeer::bind(loopback(), 4, None).unwrap();
    let addr = peer.local_addr();
    let (_next, ring) = second_generation(&peer);
    let stale = send_stream(addr, vec![zeros(1, 4)], &link(1, &key(1))).unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(
        stale.message().contains("stale generation 1"),
        "{}",
        stale.message()
    );
    // It did not reach the ring: it still waits, and times out cleanly.
    let mut ar = GrpcAllReduce::new(ring, 2, settings(4, Duration::from_millis(300))).unwrap();
    let err = ar
        .all_reduce_sum(&mut vec![1.0; 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("deadline passed"), "{err}");
}

#[test]
fn an_oversized_chunk_is_refused_before_it_is_buffered() {
    let peer = BoundPeer::bind(loopback(), 4, None).unwrap();
    let addr = peer.local_addr();
    let next = Rank0::join(1);
    let ring = join(&peer, 1, 1, 2, next.addr());
    let oversized = send_stream(addr, vec![zeros(1, 4096)], &link(1, &key(1))).unwrap_err();
    assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");
    // The member's stream broke the generation: the ring hears of it at once.
    let mut ar = GrpcAllReduce::new(ring, 1, settings(4, Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let err = ar
        .all_reduce_sum(&mut vec![1.0; 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// What rank 0 sends rank 1 of a two-rank ring for 8 values in chunks of 4 in `generation`:
/// its half of segment 0 to sum, then the reduced segment 1.
fn rank0_chunks(generation: u64) -> Vec<pb::Chunk> {
    let chunk = |phase: pb::Phase, values: [f32; 4]| pb::Chunk {
        generation,
        step: 0,
        phase: phase as i32,
        round: 0,
        index: 0,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        from_rank: 0,
    };
    vec![
        chunk(pb::Phase::ReduceScatter, [10.0, 20.0, 30.0, 40.0]),
        chunk(pb::Phase::AllGather, [-1.0, -2.0, -3.0, -4.0]),
    ]
}

/// Rank 1's values, and the sum rank 0's chunks make of them.
const RANK1: [f32; 8] = [2.0, 4.0, 6.0, 8.0, 1.0, 1.0, 1.0, 1.0];
const REDUCED: [f32; 8] = [12.0, 24.0, 36.0, 48.0, -1.0, -2.0, -3.0, -4.0];

/// The ring's wire format is plain gRPC: a stock tonic client (prost's field order, tonic's
/// framing) holding the generation's credentials can play the previous rank, and its values
/// are summed like a peer's.
#[test]
fn a_stock_grpc_client_can_play_the_previous_rank() {
    let peer = BoundPeer::bind(loopback(), 4, None).unwrap();
    let addr = peer.local_addr();
    // Rank 0 of the ring: it takes rank 1's chunks and nothing else.
    let next = Rank0::join(1);
    let ring = join(&peer, 1, 1, 2, next.addr());
    let feeder = std::thread::spawn(move || send_stream(addr, rank0_chunks(1), &link(1, &key(1))));
    let mut ar = GrpcAllReduce::new(ring, 1, settings(4, Duration::from_secs(5))).unwrap();
    let mut buf = RANK1.to_vec();
    ar.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, REDUCED);
    feeder.join().unwrap().expect("the stream is acknowledged");
}

/// Valid-looking chunks from a stranger (no credentials, a made-up tag), from a member of the
/// previous generation (its key, for this generation or its own), and a replay of the member's
/// own stream are each refused before their chunks are read; the ring sums exactly the
/// member's values, once.
#[test]
fn streams_without_the_generations_credentials_are_refused_and_never_summed() {
    let peer = BoundPeer::bind(loopback(), 4, None).unwrap();
    let addr = peer.local_addr();
    let (_next, ring) = second_generation(&peer);
    let made_up = Key::from_slice(&[7; auth::KEY_BYTES]).unwrap();
    let refusals: [(&str, Headers, tonic::Code); 6] = [
        ("no credentials", vec![], tonic::Code::Unauthenticated),
        (
            "no generation",
            vec![link(2, &key(2)).remove(1)],
            tonic::Code::Unauthenticated,
        ),
        (
            "a made-up tag",
            link(2, &made_up),
            tonic::Code::Unauthenticated,
        ),
        (
            "the previous generation's key",
            link(2, &key(1)),
            tonic::Code::Unauthenticated,
        ),
        (
            "the previous generation",
            link(1, &key(1)),
            tonic::Code::FailedPrecondition,
        ),
        (
            "not a tag",
            vec![
                (auth::GENERATION, "2".into()),
                (auth::AUTHORIZATION, auth::bearer("s3cret")),
            ],
            tonic::Code::Unauthenticated,
        ),
    ];
    for (what, headers, code) in refusals {
        let status = send_stream(addr, rank0_chunks(2), &headers).unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    let member = std::thread::spawn(move || send_stream(addr, rank0_chunks(2), &link(2, &key(2))));
    let mut ar = GrpcAllReduce::new(ring, 2, settings(4, Duration::from_secs(5))).unwrap();
    let mut buf = RANK1.to_vec();
    ar.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, REDUCED, "exactly the member's values, once");
    member
        .join()
        .unwrap()
        .expect("the member's stream is acknowledged");
    let replay = send_stream(addr, rank0_chunks(2), &link(2, &key(2))).unwrap_err();
    assert_eq!(replay.code(), tonic::Code::AlreadyExists, "{replay:?}");
    assert!(
        replay.message().contains("already open"),
        "{}",
        replay.message()
    );
}

/// A fresh CA and a certificate it signs for `names`, as PEM: (CA, certificate, key).
fn certificates(names: &[&str]) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn mutual_tls(pems: &(String, String, String)) -> Tls {
    let (ca, cert, key) = pems;
    Tls::from_pem(cert.as_bytes(), key.as_bytes(), ca.as_bytes(), true, None).unwrap()
}

/// How a call to the TLS peer at `addr` as `client` ends: `Ok` with the status the server
/// answered, or `Err` with how the connection failed before any answer (a refused handshake
/// shows as a connect error, a reset, a cancelled or broken stream, depending on timing).
fn call_over(
    addr: SocketAddr,
    url: String,
    client: Option<ClientTlsConfig>,
) -> Result<tonic::Status, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url).unwrap();
        if let Some(tls) = client {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("{addr}: {e:?}"))?;
        let mut client = pb::peer_client::PeerClient::new(channel);
        let mut request = tonic::Request::new(tokio_stream::iter(rank0_chunks(1)));
        for (name, value) in link(1, &key(1)) {
            request.metadata_mut().insert(name, value.parse().unwrap());
        }
        match client.ring(request).await {
            Ok(_) => Ok(tonic::Status::ok("the server took the stream")),
            Err(status) if std::error::Error::source(&status).is_some() => {
                Err(format!("{status:?}"))
            }
            Err(status) => Ok(status),
        }
    })
}

/// With TLS the ring runs as before, over TLS only: a plaintext client, one without a client
/// certificate (mutual TLS) and one whose certificate another CA signed never get a call
/// through, let alone a chunk.
#[test]
fn the_ring_runs_over_mutual_tls_and_refuses_everyone_else() {
    let pems = certificates(&["127.0.0.1", "localhost"]);
    three_ranks_sum(Some(mutual_tls(&pems)));

    let peer = BoundPeer::bind(loopback(), 4, Some(mutual_tls(&pems))).unwrap();
    let addr = peer.local_addr();
    let next = Rank0::join_over(1, Some(mutual_tls(&pems)));
    let ring = join(&peer, 1, 1, 2, next.addr());
    let (ca, _, _) = &pems;
    let ca = tonic::transport::Certificate::from_pem(ca);
    let no_identity = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("127.0.0.1");
    let (_, other_cert, other_key) = certificates(&["127.0.0.1"]);
    let strangers_identity = no_identity
        .clone()
        .identity(tonic::transport::Identity::from_pem(other_cert, other_key));
    for (what, url, client) in [
        ("plaintext", format!("http://{addr}"), None),
        (
            "no client certificate",
            format!("https://{addr}"),
            Some(no_identity),
        ),
        (
            "a certificate of another CA",
            format!("https://{addr}"),
            Some(strangers_identity),
        ),
    ] {
        let answer = call_over(addr, url, client);
        assert!(answer.is_err(), "{what}: the server answered {answer:?}");
    }
    // None of them reached the ring: it still waits, and times out cleanly.
    let mut ar = GrpcAllReduce::new(ring, 1, settings(4, Duration::from_millis(300))).unwrap();
    let err = ar
        .all_reduce_sum(&mut vec![1.0; 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("deadline passed"), "{err}");
}
