//! Multi-process benchmarks on loopback: `elbo bench allreduce` (ring all-reduce bus bandwidth,
//! as nccl-tests defines it) and `elbo bench train --workers N` (data-parallel training steps).
//! Each rank is a real `elbo bench rank` process; ranks learn each other's peer addresses
//! through their parent (stdout up, stdin down).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elbo_worker::grpc_ring::{BoundPeer, GrpcAllReduce};
use elbo_worker::ring::RingSettings;
use elbo_worker::Reduce;
use serde::Serialize;

use super::bench::{fixed_batch, reference_trainer, time_steps, StepTimes, MODEL};
use super::procs::{threads_each, Children};

/// How long a rank waits for a peer (a benchmark never hangs past it).
const RING_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct AllreduceArgs {
    /// Worker processes in the ring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    world: u32,
    /// Bytes all-reduced (f32 values × 4).
    #[arg(long, default_value_t = 25 << 20)]
    bytes: u64,
    /// Largest chunk sent between neighbours, in KiB (cluster.ring_chunk_kib).
    #[arg(long, default_value_t = 256)]
    chunk_kib: u64,
    /// Chunks of its own segment each rank keeps in flight (cluster.ring_depth).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    depth: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RankKind {
    Allreduce,
    Train,
}

#[derive(Debug, clap::Args)]
pub struct RankArgs {
    #[arg(long, value_enum)]
    kind: RankKind,
    #[arg(long)]
    rank: u32,
    #[arg(long)]
    world: u32,
    #[arg(long, default_value_t = 0)]
    bytes: u64,
    #[arg(long, default_value_t = 256)]
    chunk_kib: u64,
    #[arg(long, default_value_t = 1)]
    depth: u64,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 200)]
    steps: u64,
}

#[derive(Debug, Serialize)]
struct AllreduceReport {
    bytes: u64,
    world: u32,
    seconds: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    chunk_kib: u64,
    depth: u64,
}

#[derive(Debug, Serialize)]
struct DistributedTrainReport {
    model: &'static str,
    workers: u32,
    batch_size: usize,
    steps: u64,
    samples_per_s: f64,
    ms_per_step: f64,
    ms_compute: f64,
    ms_reduce: f64,
    ms_update: f64,
    final_loss: f64,
}

/// Starts `world` ranks with `extra` arguments and returns each rank's JSON result line.
fn run_ranks(world: u32, extra: &[String]) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the elbo executable")?;
    let mut children = Children::default();
    for rank in 0..world {
        let child = Command::new(&exe)
            .args(["bench", "rank", "--rank", &rank.to_string()])
            .args(["--world", &world.to_string()])
            .args(extra)
            .env("RAYON_NUM_THREADS", threads_each(world).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        children.0.push((format!("rank {rank}"), child));
    }
    let mut outputs = Vec::new();
    let mut addresses = Vec::new();
    for (name, child) in &mut children.0 {
        let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("peer ")
            .with_context(|| format!("{name} did not start its peer server"))?
            .to_string();
        addresses.push(addr);
        outputs.push(out);
    }
    let list = addresses.join(",");
    for (_, child) in &mut children.0 {
        let mut stdin = child.stdin.take().context("no stdin")?;
        writeln!(stdin, "{list}")?;
    }
    let mut results = Vec::new();
    for ((name, _), out) in children.0.iter().zip(&mut outputs) {
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim().is_empty() {
            bail!("{name} failed (see its error above)");
        }
        results.push(line);
    }
    Ok(results)
}

/// `elbo bench allreduce`.
pub fn allreduce(args: AllreduceArgs) -> anyhow::Result<()> {
    if args.bytes < 4 || args.bytes % 4 != 0 || args.bytes > 1 << 32 {
        bail!(
            "--bytes {}: expected a multiple of 4 (whole f32 values) in [4, 4 GiB]",
            args.bytes
        );
    }
    if args.chunk_kib == 0 || args.chunk_kib > 16 * 1024 {
        bail!("--chunk-kib {}: expected 1 to 16384", args.chunk_kib);
    }
    let extra = [
        "--kind".to_string(),
        "allreduce".into(),
        "--bytes".into(),
        args.bytes.to_string(),
        "--chunk-kib".into(),
        args.chunk_kib.to_string(),
        "--depth".into(),
        args.depth.to_string(),
    ];
    let results = run_ranks(args.world, &extra)?;
    let seconds = results
        .iter()
        .map(|r| serde_json::from_str::<f64>(r.trim()))
        .collect::<Result<Vec<f64>, _>>()?
        .into_iter()
        .fold(0.0, f64::max);
    let n = f64::from(args.world);
    let algbw = args.bytes as f64 / seconds / 1e9;
    let report = AllreduceReport {
        bytes: args.bytes,
        world: args.world,
        seconds,
        algbw_gbps: algbw,
        busbw_gbps: algbw * 2.0 * (n - 1.0) / n,
        chunk_kib: args.chunk_kib,
        depth: args.depth,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "elbo ring world={} bytes={} time={:.3}ms algbw={:.3}GB/s busbw={:.3}GB/s",
            report.world,
            report.bytes,
            report.seconds * 1e3,
            report.algbw_gbps,
            report.busbw_gbps
        );
    }
    Ok(())
}

/// `elbo bench train --workers N`.
pub fn train(workers: u32, batch_size: usize, steps: u64, json: bool) -> anyhow::Result<()> {
    if batch_size < workers as usize {
        bail!("--batch-size {batch_size} is smaller than --workers {workers}");
    }
    let extra = [
        "--kind".to_string(),
        "train".into(),
        "--batch-size".into(),
        batch_size.to_string(),
        "--steps".into(),
        steps.to_string(),
    ];
    let times = run_ranks(workers, &extra)?
        .iter()
        .map(|r| serde_json::from_str::<StepTimes>(r.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let slowest = |f: fn(&StepTimes) -> f64| times.iter().map(f).fold(0.0, f64::max);
    let seconds = slowest(|t| t.seconds);
    let report = DistributedTrainReport {
        model: MODEL,
        workers,
        batch_size,
        steps,
        samples_per_s: batch_size as f64 / seconds,
        ms_per_step: seconds * 1e3,
        ms_compute: slowest(|t| t.compute) * 1e3,
        ms_reduce: slowest(|t| t.reduce) * 1e3,
        ms_update: slowest(|t| t.update) * 1e3,
        final_loss: times[0].loss,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} workers, global batch {} — {:.0} samples/s, {:.3} ms/step (compute {:.3}, all-reduce {:.3}, update {:.3}; slowest rank each), loss {:.3}",
            report.model, workers, batch_size, report.samples_per_s, report.ms_per_step, report.ms_compute, report.ms_reduce, report.ms_update, report.final_loss
        );
    }
    Ok(())
}

/// Binds, swaps addresses with the parent, and connects the ring.
fn join_ring(
    rank: u32,
    world: u32,
    settings: RingSettings,
) -> anyhow::Result<(BoundPeer, GrpcAllReduce)> {
    let peer = BoundPeer::bind("127.0.0.1:0".parse()?, settings.chunk_len)?;
    println!("peer {}", peer.local_addr());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let peers = line
        .trim()
        .split(',')
        .map(str::parse::<SocketAddr>)
        .collect::<Result<Vec<_>, _>>()
        .context("bad peer list from the parent")?;
    if peers.len() != world as usize || rank >= world {
        bail!("rank {rank} of {world} got {} peer addresses", peers.len());
    }
    let next = peers[(rank as usize + 1) % world as usize];
    let ring = peer.connect(
        1,
        rank as usize,
        world as usize,
        next,
        Instant::now() + RING_TIMEOUT,
        Default::default(),
    )?;
    Ok((peer, GrpcAllReduce::new(ring, 1, settings)?))
}

/// `elbo bench rank`: one rank of a benchmark; prints its result as one JSON line.
pub fn rank(args: RankArgs) -> anyhow::Result<()> {
    let settings = RingSettings {
        chunk_len: (args.chunk_kib as usize * 1024 / 4).max(1),
        depth: args.depth as usize,
        timeout: RING_TIMEOUT,
    };
    let (_peer, mut ring) = join_ring(args.rank, args.world, settings)?;
    match args.kind {
        RankKind::Allreduce => {
            let mut buf = vec![1.0f32; (args.bytes / 4) as usize];
            for _ in 0..3 {
                ring.all_reduce_mean(&mut buf)?;
            }
            ring.all_reduce_mean(&mut vec![0.0])?;
            let reps = (2e8 / args.bytes as f64).clamp(3.0, 50.0) as u32;
            let start = Instant::now();
            for _ in 0..reps {
                ring.all_reduce_mean(&mut buf)?;
            }
            let seconds = start.elapsed().as_secs_f64() / f64::from(reps);
            println!("{seconds}");
        }
        RankKind::Train => {
            let device = candle_core::Device::Cpu;
            let mut trainer = reference_trainer(&device)?;
            let (lo, hi) = elbo_datasets::share(args.batch_size as u64, args.world, args.rank);
            let batch = fixed_batch((hi - lo) as usize, args.batch_size, lo);
            let times = time_steps(&mut trainer, &batch, &mut ring, args.steps, &device)?;
            println!("{}", serde_json::to_string(&times)?);
        }
    }
    std::io::stdout().flush()?;
    Ok(())
}
