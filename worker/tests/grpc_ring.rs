//! The ring all-reduce over gRPC on loopback: correctness and rejection of malformed chunks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce, GrpcRing};
use elbo_worker::ring::RingSettings;
use elbo_worker::Reduce;

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
        next,
        Instant::now() + Duration::from_secs(10),
        Default::default(),
    )
    .unwrap()
}

#[test]
fn three_ranks_all_reduce_over_grpc() {
    let world = 3;
    let peers: Vec<BoundPeer> = (0..world)
        .map(|_| BoundPeer::bind(loopback(), 1000).unwrap())
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
fn a_malformed_chunk_is_rejected_with_a_status() {
    use elbo_proto::v1 as pb;
    let peer = BoundPeer::bind(loopback(), 4).unwrap();
    let addr = peer.local_addr();
    let ring = join(&peer, 1, 1, 2, addr);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let mut client = pb::peer_client::PeerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let bad = pb::Chunk {
            generation: 1,
            from_rank: 0,
            phase: pb::Phase::ReduceScatter as i32,
            data: vec![1, 2, 3, 4, 5].into(),
            ..Default::default()
        };
        client
            .ring(tokio_stream::iter(vec![bad]))
            .await
            .unwrap_err()
    });
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

/// Sends `chunks` to the peer at `addr` on one stream and returns how the peer answered.
fn send_stream(addr: SocketAddr, chunks: Vec<elbo_proto::v1::Chunk>) -> tonic::Status {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = elbo_proto::v1::peer_client::PeerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client.ring(tokio_stream::iter(chunks)).await.unwrap_err()
    })
}

#[test]
fn stale_generations_and_oversized_chunks_are_refused_and_never_summed() {
    use elbo_proto::v1 as pb;
    let peer = BoundPeer::bind(loopback(), 4).unwrap();
    let addr = peer.local_addr();
    // The next rank: it holds this rank's own chunks, so only the test's streams reach `peer`.
    let next = BoundPeer::bind(loopback(), 4).unwrap();
    let _next_ring = join(&next, 2, 0, 2, addr);
    let old = join(&peer, 1, 1, 2, next.local_addr());
    drop(old);
    let ring = join(&peer, 2, 1, 2, next.local_addr());
    let chunk = |generation: u64, values: usize| pb::Chunk {
        generation,
        from_rank: 0,
        phase: pb::Phase::ReduceScatter as i32,
        data: vec![0; values * 4].into(),
        ..Default::default()
    };
    let stale = send_stream(addr, vec![chunk(1, 4)]);
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(
        stale.message().contains("stale generation 1"),
        "{}",
        stale.message()
    );
    let oversized = send_stream(addr, vec![chunk(2, 4096)]);
    assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");
    // Neither reached the ring: it still waits, and times out cleanly.
    let mut ar = GrpcAllReduce::new(ring, 2, settings(4, Duration::from_millis(300))).unwrap();
    let err = ar
        .all_reduce_sum(&mut vec![1.0; 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("deadline passed"), "{err}");
}

/// The ring's wire format is plain gRPC: a stock tonic client (prost's field order, tonic's
/// framing) can play the previous rank, and its values are summed like a peer's.
#[test]
fn a_stock_grpc_client_can_play_the_previous_rank() {
    use elbo_proto::v1 as pb;
    let peer = BoundPeer::bind(loopback(), 4).unwrap();
    let addr = peer.local_addr();
    // Rank 0 of the ring: it takes rank 1's chunks and nothing else.
    let next = BoundPeer::bind(loopback(), 4).unwrap();
    let _next_ring = join(&next, 1, 0, 2, addr);
    let ring = join(&peer, 1, 1, 2, next.local_addr());
    // What rank 0 sends rank 1 for 8 values in chunks of 4: its half of segment 0 to sum, then
    // the reduced segment 1.
    let chunk = |phase: pb::Phase, values: [f32; 4]| pb::Chunk {
        generation: 1,
        step: 0,
        phase: phase as i32,
        round: 0,
        index: 0,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        from_rank: 0,
    };
    let chunks = vec![
        chunk(pb::Phase::ReduceScatter, [10.0, 20.0, 30.0, 40.0]),
        chunk(pb::Phase::AllGather, [-1.0, -2.0, -3.0, -4.0]),
    ];
    let feeder = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut client = pb::peer_client::PeerClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                client.ring(tokio_stream::iter(chunks)).await
            })
    });
    let mut ar = GrpcAllReduce::new(ring, 1, settings(4, Duration::from_secs(5))).unwrap();
    let mut buf = vec![2.0, 4.0, 6.0, 8.0, 1.0, 1.0, 1.0, 1.0];
    ar.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, [12.0, 24.0, 36.0, 48.0, -1.0, -2.0, -3.0, -4.0]);
    feeder.join().unwrap().expect("the stream is acknowledged");
}
