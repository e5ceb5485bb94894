//! Multi-process benchmarks on loopback: `elbo bench allreduce` (ring all-reduce bus bandwidth,
//! as nccl-tests defines it) and `elbo bench train` (data-parallel training steps with
//! `--workers N`; one process runs them itself).
//! Each rank is a real `elbo bench rank` process; ranks learn each other's peer addresses
//! through their parent (stdout up, stdin down).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elbo_proto::auth::{Key, Secret};
use elbo_proto::tls::Tls;
use elbo_settings::TlsConfig;
use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce};
use elbo_worker::ring::RingSettings;
use elbo_worker::Reduce;
use serde::Serialize;

use crate::bench::{
    bench_trainer, fixed_batch, time_steps, train_here, BenchConfig, StepTimes, TrainBench,
    TrainBenchReport,
};
use crate::build::{device, Engine};
use crate::error::{io, EngineError, Result};
use crate::procs::{threads_each, Children};
use elbo_datasets::join_shape;

/// How long a rank waits for a peer (a benchmark never hangs past it).
const RING_TIMEOUT: Duration = Duration::from_secs(60);

/// What `elbo bench allreduce` measures.
#[derive(Debug, Clone)]
pub struct AllreduceBench {
    /// Worker processes in the ring (1 to 64).
    pub world: u32,
    /// Bytes all-reduced (f32 values × 4).
    pub bytes: u64,
    /// Largest chunk sent between neighbours, in KiB (cluster.ring_chunk_kib).
    pub chunk_kib: u64,
    /// Chunks of its own segment each rank keeps in flight (cluster.ring_depth, 1 to 64).
    pub depth: u64,
    /// The `elbo` executable (started as `elbo bench rank` for each rank).
    pub exe: PathBuf,
    /// The ring over TLS (off when its files are empty).
    pub tls: TlsConfig,
}

/// What one rank process of a benchmark does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankKind {
    /// Timed all-reduces.
    Allreduce,
    /// Timed training steps.
    Train,
}

/// One rank of a multi-process benchmark (`elbo bench rank`).
#[derive(Debug, Clone)]
pub struct RankBench {
    /// What it times.
    pub kind: RankKind,
    /// Its rank.
    pub rank: u32,
    /// Ranks in the ring.
    pub world: u32,
    /// Bytes all-reduced.
    pub bytes: u64,
    /// Largest chunk, in KiB.
    pub chunk_kib: u64,
    /// Chunks in flight.
    pub depth: u64,
    /// Global batch size.
    pub batch_size: usize,
    /// Timed steps.
    pub steps: u64,
    /// The ring over TLS (off when its files are empty).
    pub tls: TlsConfig,
    /// The model a config describes (train benchmarks; `None`: the reference MLP VAE).
    pub config: Option<BenchConfig>,
    /// Device of a train benchmark's rank: `cpu` or `cuda:N`.
    pub device: String,
}

/// Ring all-reduce bus bandwidth, as nccl-tests defines it.
#[derive(Debug, Serialize)]
pub struct AllreduceReport {
    /// Bytes all-reduced.
    pub bytes: u64,
    /// Ranks.
    pub world: u32,
    /// Seconds per all-reduce (the slowest rank's mean).
    pub seconds: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw_gbps: f64,
    /// Bus bandwidth, GB/s: algbw · 2(n−1)/n.
    pub busbw_gbps: f64,
    /// Chunk size, KiB.
    pub chunk_kib: u64,
    /// Chunks in flight per rank.
    pub depth: u64,
}

impl RankKind {
    fn name(self) -> &'static str {
        match self {
            RankKind::Allreduce => "allreduce",
            RankKind::Train => "train",
        }
    }
}

impl std::str::FromStr for RankKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [RankKind::Allreduce, RankKind::Train]
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("{s:?}: expected allreduce or train"))
    }
}

/// The arguments of `elbo bench rank` for a rank of this benchmark (`--rank` and `--world`
/// aside).
fn rank_args(bench: &RankBench) -> Vec<String> {
    let mut args: Vec<(&str, String)> = vec![
        ("--kind", bench.kind.name().to_string()),
        ("--bytes", bench.bytes.to_string()),
        ("--chunk-kib", bench.chunk_kib.to_string()),
        ("--depth", bench.depth.to_string()),
        ("--batch-size", bench.batch_size.to_string()),
        ("--steps", bench.steps.to_string()),
        ("--device", bench.device.clone()),
    ];
    if let Some(config) = &bench.config {
        if let Some(file) = &config.file {
            args.push(("--config", file.to_string_lossy().into_owned()));
        }
        args.extend(config.set.iter().map(|s| ("--set", s.clone())));
        args.push(("--shape", join_shape(&config.shape)));
    }
    let tls = &bench.tls;
    if tls.enabled() {
        args.extend([
            ("--tls-cert", tls.cert.clone()),
            ("--tls-key", tls.key.clone()),
            ("--tls-ca", tls.ca.clone()),
        ]);
        if !tls.server_name.is_empty() {
            args.push(("--tls-server-name", tls.server_name.clone()));
        }
    }
    let mut args: Vec<String> = args
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
    if tls.mutual {
        args.push("--tls-mutual".into());
    }
    args
}

/// Starts `world` ranks with `extra` arguments and returns each rank's JSON result line.
fn run_ranks(exe: &Path, world: u32, extra: &[String]) -> Result<Vec<String>> {
    let mut children = Children::default();
    for rank in 0..world {
        let child = Command::new(exe)
            .args(["bench", "rank", "--rank", &rank.to_string()])
            .args(["--world", &world.to_string()])
            .args(extra)
            .env("RAYON_NUM_THREADS", threads_each(world).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io(format!("cannot start {}", exe.display())))?;
        children.0.push((format!("rank {rank}"), child));
    }
    let mut outputs = Vec::new();
    let mut addresses = Vec::new();
    let pipe = |name: &str| EngineError::Failed(format!("{name}: no pipe to the rank"));
    let talk = |name: &str| io(format!("cannot talk to {name}"));
    for (name, child) in &mut children.0 {
        let mut out = BufReader::new(child.stdout.take().ok_or_else(|| pipe(name))?);
        let mut line = String::new();
        out.read_line(&mut line).map_err(talk(name))?;
        let addr = line
            .trim()
            .strip_prefix("peer ")
            .ok_or_else(|| EngineError::Failed(format!("{name} did not start its peer server")))?
            .to_string();
        addresses.push(addr);
        outputs.push(out);
    }
    let list = addresses.join(",");
    // The ranks' ring key, fresh for this benchmark.
    let key = Secret::random().map_err(EngineError::Failed)?.ring_key(1);
    for (name, child) in &mut children.0 {
        let mut stdin = child.stdin.take().ok_or_else(|| pipe(name))?;
        writeln!(stdin, "{list} {}", key.to_hex()).map_err(talk(name))?;
    }
    let mut results = Vec::new();
    for ((name, _), out) in children.0.iter().zip(&mut outputs) {
        let mut line = String::new();
        out.read_line(&mut line).map_err(talk(name))?;
        if line.trim().is_empty() {
            return Err(EngineError::Failed(format!(
                "{name} failed (see its error above)"
            )));
        }
        results.push(line);
    }
    Ok(results)
}

/// `elbo bench allreduce`.
pub fn allreduce(args: &AllreduceBench) -> Result<AllreduceReport> {
    if args.bytes < 4 || args.bytes % 4 != 0 || args.bytes > 1 << 32 {
        return Err(EngineError::Invalid(format!(
            "--bytes {}: expected a multiple of 4 (whole f32 values) in [4, 4 GiB]",
            args.bytes
        )));
    }
    if args.chunk_kib == 0 || args.chunk_kib > 16 * 1024 {
        return Err(EngineError::Invalid(format!(
            "--chunk-kib {}: expected 1 to 16384",
            args.chunk_kib
        )));
    }
    if !(1..=64).contains(&args.world) || !(1..=64).contains(&args.depth) {
        return Err(EngineError::Invalid(format!(
            "--world {} and --depth {}: expected 1 to 64",
            args.world, args.depth
        )));
    }
    let bench = RankBench {
        kind: RankKind::Allreduce,
        rank: 0,
        world: args.world,
        bytes: args.bytes,
        chunk_kib: args.chunk_kib,
        depth: args.depth,
        batch_size: 0,
        steps: 0,
        config: None,
        device: "cpu".into(),
        tls: args.tls.clone(),
    };
    let results = run_ranks(&args.exe, args.world, &rank_args(&bench))?;
    let seconds = results
        .iter()
        .map(|r| r.trim().parse::<f64>())
        .collect::<Result<Vec<f64>, _>>()
        .map_err(|e| EngineError::Failed(format!("a rank reported no time: {e}")))?
        .into_iter()
        .fold(0.0, f64::max);
    let n = f64::from(args.world);
    let algbw = args.bytes as f64 / seconds / 1e9;
    Ok(AllreduceReport {
        bytes: args.bytes,
        world: args.world,
        seconds,
        algbw_gbps: algbw,
        busbw_gbps: algbw * 2.0 * (n - 1.0) / n,
        chunk_kib: args.chunk_kib,
        depth: args.depth,
    })
}

/// `elbo bench train`: full training steps on a fixed random binary batch, in one process or
/// data-parallel over `workers` rank processes.
pub fn train_bench(engine: &Engine, args: &TrainBench) -> Result<TrainBenchReport> {
    if args.batch_size == 0 || args.steps == 0 || !(1..=64).contains(&args.workers) {
        return Err(EngineError::Invalid(
            "--batch-size and --steps must be positive, --workers 1 to 64".into(),
        ));
    }
    if args.workers == 1 && args.tls.enabled() {
        return Err(EngineError::Invalid(
            "--tls-*: one worker has no ring to secure; pass --workers 2 or more".into(),
        ));
    }
    if args.workers == 1 {
        return train_here(engine, args);
    }
    if args.batch_size < args.workers as usize {
        return Err(EngineError::Invalid(format!(
            "--batch-size {} is smaller than --workers {}",
            args.batch_size, args.workers
        )));
    }
    let bench = RankBench {
        kind: RankKind::Train,
        rank: 0,
        world: args.workers,
        bytes: 0,
        chunk_kib: 256,
        depth: 1,
        batch_size: args.batch_size,
        steps: args.steps,
        config: args.config.clone(),
        device: args.device.clone(),
        tls: args.tls.clone(),
    };
    // The model as the ranks build it, built here on the CPU for its name alone (a bad config
    // is refused before any rank starts).
    let (_, model, _, _) = bench_trainer(
        engine,
        args.config.as_ref(),
        args.steps,
        &candle_core::Device::Cpu,
    )?;
    let times = run_ranks(&args.exe, args.workers, &rank_args(&bench))?
        .iter()
        .map(|r| serde_json::from_str::<StepTimes>(r.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Failed(format!("a rank reported no times: {e}")))?;
    let slowest = |f: fn(&StepTimes) -> f64| times.iter().map(f).fold(0.0, f64::max);
    let seconds = slowest(|t| t.seconds);
    Ok(TrainBenchReport {
        model,
        workers: args.workers,
        batch_size: args.batch_size,
        steps: args.steps,
        samples_per_s: args.batch_size as f64 / seconds,
        ms_per_step: seconds * 1e3,
        ms_compute: slowest(|t| t.compute) * 1e3,
        ms_reduce: slowest(|t| t.reduce) * 1e3,
        ms_update: slowest(|t| t.update) * 1e3,
        final_loss: times[0].loss,
    })
}

/// Binds (with `tls`, over TLS), swaps addresses with the parent (and takes the ring key from
/// it), and connects the ring.
fn join_ring(
    rank: u32,
    world: u32,
    settings: RingSettings,
    tls: Option<Tls>,
) -> Result<(BoundPeer, GrpcAllReduce)> {
    let peer = BoundPeer::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        settings.chunk_len,
        tls,
    )?;
    let parent = || io("cannot talk to the parent");
    println!("peer {}", peer.local_addr());
    std::io::stdout().flush().map_err(parent())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(parent())?;
    let (list, key) = line
        .trim()
        .split_once(' ')
        .and_then(|(list, key)| Some((list, Key::from_hex(key)?)))
        .ok_or_else(|| {
            EngineError::Invalid("expected the peer list and the ring key from the parent".into())
        })?;
    let peers = list
        .split(',')
        .map(str::parse::<SocketAddr>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Invalid(format!("bad peer list from the parent: {e}")))?;
    if peers.len() != world as usize || rank >= world {
        return Err(EngineError::Invalid(format!(
            "rank {rank} of {world} got {} peer addresses",
            peers.len()
        )));
    }
    let next = peers[(rank as usize + 1) % world as usize];
    let ring = peer.connect(
        1,
        rank as usize,
        world as usize,
        &key,
        next,
        Instant::now() + RING_TIMEOUT,
        Default::default(),
    )?;
    Ok((peer, GrpcAllReduce::new(ring, 1, settings)?))
}

/// `elbo bench rank`: one rank of a benchmark (talks to its parent on stdin and stdout);
/// returns its result as one JSON line for the parent.
pub fn rank(engine: &Engine, args: &RankBench) -> Result<String> {
    let settings = RingSettings {
        chunk_len: (args.chunk_kib as usize * 1024 / 4).max(1),
        depth: args.depth as usize,
        timeout: RING_TIMEOUT,
    };
    let tls = crate::tls::load(&args.tls, crate::tls::FLAGS)?;
    let (_peer, mut ring) = join_ring(args.rank, args.world, settings, tls)?;
    match args.kind {
        RankKind::Allreduce => {
            let mut buf = vec![1.0f32; (args.bytes / 4) as usize];
            for _ in 0..3 {
                ring.all_reduce_sum(&mut buf)?;
            }
            ring.all_reduce_sum(&mut vec![0.0])?;
            let reps = (2e8 / args.bytes as f64).clamp(3.0, 50.0) as u32;
            let start = Instant::now();
            for _ in 0..reps {
                ring.all_reduce_sum(&mut buf)?;
            }
            Ok((start.elapsed().as_secs_f64() / f64::from(reps)).to_string())
        }
        RankKind::Train => {
            let device = device(&args.device)?;
            let (mut trainer, _, dim, labels) =
                bench_trainer(engine, args.config.as_ref(), args.steps, &device)?;
            let global = args.batch_size as u64;
            let (lo, hi) = elbo_datasets::share(global, args.world, args.rank);
            let batch = fixed_batch(lo, hi, global, dim, labels);
            let times = time_steps(&mut trainer, &batch, &mut ring, args.steps, &device)?;
            serde_json::to_string(&times).map_err(|e| EngineError::Failed(e.to_string()))
        }
    }
}
