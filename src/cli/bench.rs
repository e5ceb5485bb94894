//! `elbo bench …`: throughput measurements (the engine runs them; this prints them).

use clap::Subcommand;
use elbo_engine::{
    AllreduceBench, DataBench, RankBench, RankKind, TrainBench, MODEL as REFERENCE_MODEL,
};
use serde::Serialize;

use super::args::cache_root;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a uint8 Parquet dataset through the reader into shuffled f32 batches.
    Data(DataBenchArgs),
    /// Time full training steps (forward, backward, optimiser) of the MLP VAE 784-400-20.
    Train(TrainBenchArgs),
    /// Ring all-reduce bus bandwidth between worker processes on loopback.
    Allreduce(AllreduceArgs),
    /// One rank of a multi-process benchmark (started by the benchmarks themselves).
    #[command(hide = true)]
    Rank(RankArgs),
}

#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    /// Worker processes, each training its share of the batch, joined by the ring all-reduce.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Batch size (global, over all workers).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps (after 10 warm-up steps).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DataBenchArgs {
    /// Dataset to stream; by default a synthetic MNIST-sized file (rows × 784 uint8, ~80 %
    /// zeros like handwritten digits) generated once into the cache directory.
    #[arg(long)]
    file: Option<String>,
    /// Rows of the synthetic file.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: u64,
    /// Shuffle window in rows.
    #[arg(long, default_value_t = 16_384)]
    shuffle_window: u64,
    /// Decoder threads (default: one per core).
    #[arg(long)]
    decode_threads: Option<usize>,
    /// Epochs to time (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

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

#[derive(Debug, clap::Args)]
pub struct RankArgs {
    #[arg(long)]
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

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    match cmd {
        BenchCommand::Data(a) => {
            let report = elbo_engine::data_bench(&DataBench {
                file: a.file,
                rows: a.rows,
                batch_size: a.batch_size,
                shuffle_window: a.shuffle_window,
                decode_threads: a
                    .decode_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                repeats: a.repeats,
                cache: cache_root(),
            })?;
            let text = format!(
                "streamed {} rows × {} in {:.3} s: {:.0} rows/s, {:.1} MB/s, peak RSS {}",
                report.rows,
                report.dim,
                report.seconds,
                report.rows_per_s,
                report.mb_per_s,
                report
                    .peak_rss_mib
                    .map_or("n/a".into(), |m| format!("{m:.1} MiB"))
            );
            show(&report, a.json, text)
        }
        BenchCommand::Train(a) => {
            let r = elbo_engine::train_bench(&TrainBench {
                workers: a.workers,
                batch_size: a.batch_size,
                steps: a.steps,
                device: a.device,
                exe,
            })?;
            let text = format!(
                "{REFERENCE_MODEL}: {} workers, global batch {} — {:.0} samples/s, {:.3} ms/step (compute {:.3}, all-reduce {:.3}, update {:.3}; slowest rank each), loss {:.3}",
                r.workers, r.batch_size, r.samples_per_s, r.ms_per_step, r.ms_compute, r.ms_reduce, r.ms_update, r.final_loss
            );
            show(&r, a.json, text)
        }
        BenchCommand::Allreduce(a) => {
            let r = elbo_engine::allreduce(&AllreduceBench {
                world: a.world,
                bytes: a.bytes,
                chunk_kib: a.chunk_kib,
                depth: a.depth,
                exe,
            })?;
            let text = format!(
                "elbo ring world={} bytes={} time={:.3}ms algbw={:.3}GB/s busbw={:.3}GB/s",
                r.world,
                r.bytes,
                r.seconds * 1e3,
                r.algbw_gbps,
                r.busbw_gbps
            );
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            show(&r, false, text)
        }
        BenchCommand::Rank(a) => {
            let line = elbo_engine::rank(&RankBench {
                kind: a.kind,
                rank: a.rank,
                world: a.world,
                bytes: a.bytes,
                chunk_kib: a.chunk_kib,
                depth: a.depth,
                batch_size: a.batch_size,
                steps: a.steps,
            })?;
            println!("{line}");
            Ok(())
        }
    }
}

/// Prints a report as pretty JSON or as its line of text.
fn show(report: &impl Serialize, json: bool, text: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{text}");
    }
    Ok(())
}
