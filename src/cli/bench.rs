//! `elbo bench …`: throughput measurements (the engine runs them; this prints them).

use std::path::PathBuf;

use clap::Subcommand;
use elbo_datasets::parse_shape;
use elbo_engine::{
    AllreduceBench, BenchConfig, DataBench, Engine, RankBench, RankKind, TrainBench,
};
use serde::Serialize;

use super::args::{cache_root, TlsArgs};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a uint8 Parquet dataset through the reader into shuffled f32 batches.
    Data(DataBenchArgs),
    /// Time full training steps (forward, backward, optimiser) of the MLP VAE 784-400-20, or of
    /// the model a config describes (--config / --set) on synthetic examples of --shape.
    Train(TrainBenchArgs),
    /// Ring all-reduce bus bandwidth between worker processes on loopback.
    Allreduce(AllreduceArgs),
    /// One rank of a multi-process benchmark (started by the benchmarks themselves).
    #[command(hide = true)]
    Rank(RankArgs),
}

/// The model a benchmark times: the reference MLP VAE, or a configured one.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchModelArgs {
    /// Time the model of this config file (default: the reference MLP VAE 784-400-20).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override a key of the benchmark's config, e.g. `--set model.kind=m2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shape of the synthetic examples of a configured model, e.g. 1,28,28.
    #[arg(long, value_name = "C,H,W")]
    shape: Option<String>,
}

impl BenchModelArgs {
    fn resolve(self) -> anyhow::Result<Option<BenchConfig>> {
        if self.config.is_none() && self.set.is_empty() {
            if self.shape.is_some() {
                bad!("--shape applies to a configured model (--config or --set)");
            }
            return Ok(None);
        }
        let text = self.shape.as_deref().unwrap_or("1,28,28");
        let shape = parse_shape(text).ok_or_else(|| {
            super::BadInput(format!("--shape {text:?}: expected sizes like 1,28,28"))
        })?;
        Ok(Some(BenchConfig {
            file: self.config,
            set: self.set,
            shape,
        }))
    }
}

#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    model: BenchModelArgs,
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
    /// The workers' ring over TLS (a certificate valid for 127.0.0.1, or --tls-server-name).
    #[command(flatten)]
    tls: TlsArgs,
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
    /// The ring over TLS (a certificate valid for 127.0.0.1, or --tls-server-name).
    #[command(flatten)]
    tls: TlsArgs,
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
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    model: BenchModelArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(engine: &Engine, cmd: BenchCommand) -> anyhow::Result<()> {
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
            let r = elbo_engine::train_bench(
                engine,
                &TrainBench {
                    config: a.model.resolve()?,
                    workers: a.workers,
                    batch_size: a.batch_size,
                    steps: a.steps,
                    device: a.device,
                    exe,
                    tls: a.tls.settings(),
                },
            )?;
            let text = format!(
                "{}: {} workers, global batch {} — {:.0} samples/s, {:.3} ms/step (compute {:.3}, all-reduce {:.3}, update {:.3}; slowest rank each), loss {:.3}",
                r.model, r.workers, r.batch_size, r.samples_per_s, r.ms_per_step, r.ms_compute, r.ms_reduce, r.ms_update, r.final_loss
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
                tls: a.tls.settings(),
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
            let line = elbo_engine::rank(
                engine,
                &RankBench {
                    config: a.model.resolve()?,
                    kind: a.kind,
                    rank: a.rank,
                    world: a.world,
                    bytes: a.bytes,
                    chunk_kib: a.chunk_kib,
                    depth: a.depth,
                    batch_size: a.batch_size,
                    steps: a.steps,
                    device: a.device,
                    tls: a.tls.settings(),
                },
            )?;
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
