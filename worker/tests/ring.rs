//! The ring all-reduce over an in-process transport: results, determinism, validation, deadlines.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::{
    unbounded_channel as channel, UnboundedReceiver as Receiver, UnboundedSender as Sender,
};

use elbo_worker::ring::{Chunk, Outgoing, Phase, RingAllReduce, RingSettings, RingTransport};
use elbo_worker::{Reduce, Result, WorkerError};

/// Links of one rank: a channel to the next rank, one from the previous.
struct Link {
    rank: usize,
    world: usize,
    to_next: Sender<Chunk>,
    from_prev: Receiver<Chunk>,
    /// Tampers with outgoing chunks (for the rejection tests).
    tamper: Option<fn(&mut Chunk)>,
}

impl RingTransport for Link {
    type Payload = Vec<f32>;
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn send(&mut self, chunk: Chunk<Outgoing<'_, Vec<f32>>>) -> Result<()> {
        let mut chunk = chunk.to_owned_chunk();
        if let Some(t) = self.tamper {
            t(&mut chunk);
        }
        self.to_next
            .send(chunk)
            .map_err(|_| WorkerError::Invalid("next rank is gone".into()))
    }
    async fn recv(&mut self, deadline: Instant) -> Result<Chunk> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.from_prev.recv()).await {
            Ok(Some(chunk)) => Ok(chunk),
            Ok(None) => Err(WorkerError::Invalid("previous rank is gone".into())),
            Err(_) => Err(WorkerError::Invalid(
                "deadline passed waiting for the previous rank".into(),
            )),
        }
    }
}

fn ring(world: usize) -> Vec<Link> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| channel()).unzip();
    // Rank r receives on channel r; it sends on channel r + 1.
    let mut receivers: Vec<Option<Receiver<Chunk>>> = receivers.into_iter().map(Some).collect();
    (0..world)
        .map(|rank| Link {
            rank,
            world,
            to_next: senders[(rank + 1) % world].clone(),
            from_prev: receivers[rank].take().unwrap(),
            tamper: None,
        })
        .collect()
}

/// The in-process ring as a trainer's [`Reduce`]: each all-reduce runs to its end on the
/// calling thread.
struct Blocking(RingAllReduce<Link>, tokio::runtime::Runtime);

impl Reduce for Blocking {
    fn world(&self) -> u32 {
        self.0.transport().world() as u32
    }
    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.1.block_on(self.0.all_reduce_sum(buf))
    }
}

/// A runtime that runs futures on the thread that blocks on them.
fn local_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn values(rank: usize, len: usize, step: u64) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + rank * 17 + step as usize * 7) % 101) as f32 * 0.37 - 12.0)
        .collect()
}

fn settings(chunk_len: usize, depth: usize, timeout: Duration) -> RingSettings {
    RingSettings {
        chunk_len,
        depth,
        timeout,
    }
}

/// Runs `steps` all-reduces on every rank (one thread each), in chunks of `chunk` values with
/// `depth` chunks in flight; returns each rank's buffers.
fn run(
    links: Vec<Link>,
    len: usize,
    (chunk, depth): (usize, usize),
    steps: u64,
) -> Vec<Result<Vec<Vec<f32>>>> {
    let handles: Vec<_> = links
        .into_iter()
        .map(|link| {
            std::thread::spawn(move || {
                let rank = link.rank;
                let mut ar =
                    RingAllReduce::new(link, 7, settings(chunk, depth, Duration::from_secs(5)))?;
                let runtime = local_runtime();
                (0..steps)
                    .map(|step| {
                        let mut buf = values(rank, len, step);
                        runtime.block_on(ar.all_reduce_sum(&mut buf)).map(|()| buf)
                    })
                    .collect()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_rank_gets_the_sum_with_identical_bits() {
    for world in 1..=6 {
        for (len, chunk, depth) in [
            (1, 4, 1),
            (5, 2, 1),
            (37, 4, 2),
            (1000, 64, 1),
            (1000, 64, 3),
            (1000, 1000, 1),
        ] {
            let results = run(ring(world), len, (chunk, depth), 3);
            let results: Vec<Vec<Vec<f32>>> = results.into_iter().map(|r| r.unwrap()).collect();
            let first = &results[0];
            for (step, got) in first.iter().enumerate() {
                let inputs: Vec<Vec<f32>> =
                    (0..world).map(|r| values(r, len, step as u64)).collect();
                for (i, got) in got.iter().enumerate() {
                    let want = inputs.iter().map(|v| f64::from(v[i])).sum::<f64>();
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "world {world} len {len}: {got} vs {want}"
                    );
                }
            }
            for (r, other) in results.iter().enumerate().skip(1) {
                let same = other
                    .iter()
                    .flatten()
                    .zip(first.iter().flatten())
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "world {world}: rank {r} differs from rank 0");
            }
        }
    }
}

#[test]
fn the_result_does_not_depend_on_the_chunk_size_or_the_depth() {
    let a = run(ring(4), 999, (7, 1), 1).remove(2).unwrap();
    let b = run(ring(4), 999, (500, 1), 1).remove(2).unwrap();
    let c = run(ring(4), 999, (7, 5), 1).remove(2).unwrap();
    assert_eq!(
        a, b,
        "chunking pipelines the transfer but sums in the same order"
    );
    assert_eq!(a, c, "so does keeping more chunks in flight");
}

fn rejected_with(tamper: fn(&mut Chunk), expect: &str) {
    let mut links = ring(3);
    links[1].tamper = Some(tamper);
    let results = run(links, 60, (8, 1), 1);
    let err = results[2]
        .as_ref()
        .expect_err("rank 2 receives rank 1's chunks and must reject them")
        .to_string();
    assert!(err.contains(expect), "{err}");
}

#[test]
fn malformed_stale_or_oversized_chunks_are_rejected_never_summed() {
    rejected_with(|c| c.generation = 6, "rejected a chunk");
    rejected_with(|c| c.step += 1, "rejected a chunk");
    rejected_with(|c| c.phase = Phase::AllGather, "rejected a chunk");
    rejected_with(|c| c.index += 1, "rejected a chunk");
    rejected_with(|c| c.data.push(1.0), "rejected a chunk");
    rejected_with(|c| c.data.truncate(1), "rejected a chunk");
}

#[test]
fn a_silent_neighbour_ends_in_an_error_at_the_deadline() {
    let mut links = ring(2);
    let rank1 = links.pop().unwrap();
    let rank0 = links.pop().unwrap();
    let started = Instant::now();
    let mut ar = RingAllReduce::new(rank0, 1, settings(16, 1, Duration::from_millis(200))).unwrap();
    let mut buf = vec![1.0f32; 40];
    let err = local_runtime()
        .block_on(ar.all_reduce_sum(&mut buf))
        .unwrap_err()
        .to_string();
    assert!(err.contains("deadline"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no hang past the deadline"
    );
    drop(rank1);
}

#[test]
fn invalid_settings_are_refused() {
    for (chunk, depth) in [(0, 1), (4, 0)] {
        let link = ring(2).into_iter().next().unwrap();
        let err = RingAllReduce::new(link, 0, settings(chunk, depth, Duration::from_secs(1)))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("must be positive"), "{err}");
    }
}

/// N trainers on their parts of each global batch, joined by the ring, end with the parameters
/// of one trainer on the whole batch (up to summation order), and identical to each other —
/// with free bits too, whose clamp needs the global batch's KL (a collective of its own).
#[test]
fn data_parallel_training_over_the_ring_equals_one_process() {
    use candle_core::Device;
    use elbo_datasets::{Batch, Cursor};
    use elbo_models::{Activation, Architecture, LikelihoodKind, ModelSpec, Objective, Vae};
    use elbo_settings::OptimizerKind;
    use elbo_worker::{LocalReduce, OptimizerConfig, Schedule, StepConfig, Trainer};

    fn trainer(objective: Objective) -> Trainer {
        let spec = ModelSpec {
            input_shape: vec![12],
            latent_dim: 3,
            architecture: Architecture::Mlp,
            hidden: vec![10],
            activation: Activation::Relu,
            likelihood: LikelihoodKind::Bernoulli,
            variance: 1.0,
            log_var_clamp: 8.0,
            objective,
        };
        let config = StepConfig {
            optimizer: OptimizerConfig::defaults(OptimizerKind::Adam),
            lr: 1e-2,
            schedule: Schedule::constant(),
            clip_norm: 0.0,
            max_nonfinite: 1,
            seed: 3,
        };
        Trainer::new(Box::new(Vae::new(spec, &Device::Cpu, 3).unwrap()), config).unwrap()
    }
    /// Rows `range` of the global batch of `step` (7 rows: uneven across 2 and 3 ranks).
    fn part(step: u64, range: std::ops::Range<usize>) -> Batch {
        let ids: Vec<u64> = range.clone().map(|i| step * 7 + i as u64).collect();
        let x = ids
            .iter()
            .flat_map(|id| (0..12).map(move |j| ((id * 5 + j) % 3) as f32 / 2.0))
            .collect();
        Batch {
            x,
            dim: 12,
            labels: vec![None; ids.len()],
            ids,
            global_rows: 7,
            cursor_after: Cursor {
                epoch: 0,
                step: step + 1,
            },
        }
    }
    let steps = 5;
    let free_bits = Objective {
        free_bits: 0.5,
        ..Objective::default()
    };
    for objective in [Objective::default(), free_bits] {
        let mut single = trainer(objective);
        for step in 0..steps {
            single
                .train_step(&part(step, 0..7), &mut LocalReduce, &Device::Cpu)
                .unwrap();
        }
        for world in [2usize, 3] {
            let handles: Vec<_> = ring(world)
                .into_iter()
                .map(|link| {
                    std::thread::spawn(move || {
                        let rank = link.rank;
                        let mut reduce = Blocking(
                            RingAllReduce::new(link, 1, settings(5, 1, Duration::from_secs(5)))
                                .unwrap(),
                            local_runtime(),
                        );
                        let mut t = trainer(objective);
                        for step in 0..steps {
                            let (lo, hi) = (rank * 7 / world, (rank + 1) * 7 / world);
                            t.train_step(&part(step, lo..hi), &mut reduce, &Device::Cpu)
                                .unwrap();
                        }
                        t.params().unwrap()
                    })
                })
                .collect();
            let params: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            for p in &params[1..] {
                assert_eq!(p, &params[0], "world {world}: replicas identical");
            }
            for (a, b) in params[0].iter().zip(single.params().unwrap()) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "world {world}, {objective:?}: {a} vs single-process {b}"
                );
            }
        }
    }
}
