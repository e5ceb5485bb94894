//! `elbo bench …`: throughput measurements.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Subcommand;
use elbo_datasets::{
    BatchStream, Binarize, Binarizer, DataSchema, Dataset, DatasetWriter, PixelSlice, PixelType,
    Rows, WriterSpec, DEFAULT_ROW_GROUP_SIZE,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use elbo_datasets::{Batch, Cursor};
use elbo_models::{Activation, Architecture, LikelihoodKind, Objective, Vae, VaeSpec};
use elbo_worker::{
    LocalReduce, OptimizerConfig, OptimizerKind, Reduce, Schedule, StepConfig, Trainer,
};

use super::layers::cache_root;

/// The benchmark model, as reports name it.
pub(super) const MODEL: &str = "mlp-vae 784-400-20 bernoulli adam";

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a uint8 Parquet dataset through the reader into shuffled f32 batches.
    Data(DataBenchArgs),
    /// Time full training steps (forward, backward, optimiser) of the MLP VAE 784-400-20.
    Train(TrainBenchArgs),
    /// Ring all-reduce bus bandwidth between worker processes on loopback.
    Allreduce(super::bench_ring::AllreduceArgs),
    /// One rank of a multi-process benchmark (started by the benchmarks themselves).
    #[command(hide = true)]
    Rank(super::bench_ring::RankArgs),
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

#[derive(Debug, Serialize)]
struct TrainBenchReport {
    model: &'static str,
    batch_size: usize,
    steps: u64,
    samples_per_s: f64,
    ms_per_step: f64,
    /// Mean milliseconds per step in forward + backward + gradient packing.
    ms_compute: f64,
    /// Mean milliseconds per step in clipping, the optimiser and the parameter write-back.
    ms_update: f64,
    final_loss: f64,
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

#[derive(Debug, Serialize)]
struct DataBenchReport {
    file: String,
    rows: u64,
    dim: usize,
    batch_size: u64,
    decode_threads: usize,
    seconds: f64,
    rows_per_s: f64,
    /// Megabytes (10^6) of stored example values (uint8: one byte each) per second.
    mb_per_s: f64,
    /// Peak resident memory while streaming (VmHWM after a reset), in MiB.
    peak_rss_mib: Option<f64>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Data(args) => bench_data(args),
        BenchCommand::Train(args) => bench_train(args),
        BenchCommand::Allreduce(args) => super::bench_ring::allreduce(args),
        BenchCommand::Rank(args) => super::bench_ring::rank(args),
    }
}

fn synthetic_file(rows: u64) -> anyhow::Result<PathBuf> {
    let dir = cache_root();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    let path = dir.join(format!("bench-data-v1-{rows}x784.parquet"));
    if path.is_file() {
        return Ok(path);
    }
    let dim = 784;
    let spec = WriterSpec {
        schema: DataSchema {
            shape: vec![1, 28, 28],
            dim,
            pixel: PixelType::Uint8,
            has_label: true,
            has_id: true,
        },
        extra_columns: vec![],
        row_group_size: DEFAULT_ROW_GROUP_SIZE,
    };
    let mut writer = DatasetWriter::create(&path, spec)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut start = 0;
    while start < rows {
        let n = (DEFAULT_ROW_GROUP_SIZE as u64).min(rows - start);
        let x: Vec<u8> = (0..n as usize * dim)
            .map(|_| {
                if rng.random::<f32>() < 0.8 {
                    0
                } else {
                    rng.random_range(1..=255)
                }
            })
            .collect();
        let labels: Vec<Option<i64>> = (0..n).map(|_| Some(rng.random_range(0..10))).collect();
        let ids: Vec<u64> = (start..start + n).collect();
        writer.write(Rows {
            x: PixelSlice::Uint8(&x),
            labels: Some(&labels),
            ids: Some(&ids),
            extra: &[],
        })?;
        start += n;
    }
    writer.finish()?;
    Ok(path)
}

/// Resets the kernel's peak-RSS mark of this process (Linux), so VmHWM measures from now.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn bench_data(args: DataBenchArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.shuffle_window == 0 || args.repeats == 0 || args.rows == 0 {
        bail!("--rows, --batch-size, --shuffle-window and --repeats must be positive");
    }
    let file = match &args.file {
        Some(f) => f.clone(),
        None => synthetic_file(args.rows)?.to_string_lossy().into_owned(),
    };
    let ds = Arc::new(Dataset::open(&file)?);
    let threads = args
        .decode_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let plan = ds.plan(0, args.batch_size, args.shuffle_window, true)?;
    let binarizer = Binarizer::new(Binarize::None, 0);
    let have_peak = reset_peak_rss();
    let mut best = f64::INFINITY;
    for epoch in 0..u64::from(args.repeats) {
        let start = Instant::now();
        let mut rows = 0u64;
        let mut checksum = 0f32;
        for batch in BatchStream::new(ds.clone(), plan.plan(epoch, 1, 0)?, binarizer, threads) {
            let batch = batch?;
            rows += batch.rows() as u64;
            checksum += batch.x[0];
        }
        let secs = start.elapsed().as_secs_f64();
        if rows != ds.rows() {
            bail!("streamed {rows} rows of {}", ds.rows());
        }
        tracing::debug!(epoch, secs, checksum, "streamed one epoch");
        best = best.min(secs);
    }
    let dim = ds.schema().dim;
    let bytes_per_value = match ds.schema().pixel {
        PixelType::Uint8 => 1.0,
        PixelType::Float32 => 4.0,
    };
    let report = DataBenchReport {
        file,
        rows: ds.rows(),
        dim,
        batch_size: args.batch_size,
        decode_threads: threads,
        seconds: best,
        rows_per_s: ds.rows() as f64 / best,
        mb_per_s: ds.rows() as f64 * dim as f64 * bytes_per_value / best / 1e6,
        peak_rss_mib: if have_peak { peak_rss_mib() } else { None },
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
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
    }
    Ok(())
}

/// The reference MLP VAE of `../shared/reference/torch_vae_step.py`: 784-400-20, ReLU,
/// Bernoulli likelihood, analytic KL, Adam at 1e-3.
pub(super) fn reference_trainer(device: &candle_core::Device) -> anyhow::Result<Trainer> {
    let spec = VaeSpec {
        input_shape: vec![784],
        latent_dim: 20,
        architecture: Architecture::Mlp,
        hidden: vec![400],
        activation: Activation::Relu,
        likelihood: LikelihoodKind::Bernoulli,
        variance: 1.0,
        log_var_clamp: 30.0,
    };
    let model = Vae::new(spec, device, 0)?;
    let config = StepConfig {
        objective: Objective::default(),
        optimizer: OptimizerConfig::defaults(OptimizerKind::Adam),
        lr: 1e-3,
        schedule: Schedule::Constant,
        clip_norm: 0.0,
        max_nonfinite: 10,
        seed: 0,
    };
    Ok(Trainer::new(Box::new(model), config)?)
}

/// A fixed random binary batch of `rows` rows of a global batch of `global_rows`.
pub(super) fn fixed_batch(rows: usize, global_rows: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Batch {
        x: (0..rows * 784)
            .map(|_| if rng.random::<f32>() > 0.5 { 1.0 } else { 0.0 })
            .collect(),
        dim: 784,
        labels: vec![None; rows],
        ids: (0..rows as u64).collect(),
        global_rows: global_rows as u64,
        cursor_after: Cursor::start(0),
    }
}

/// Mean seconds per step and per part over timed steps (after 10 warm-up steps).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub(super) struct StepTimes {
    pub seconds: f64,
    pub compute: f64,
    pub reduce: f64,
    pub update: f64,
    pub loss: f64,
}

/// Runs 10 warm-up steps, then `steps` timed ones.
pub(super) fn time_steps(
    trainer: &mut Trainer,
    batch: &Batch,
    reduce: &mut dyn Reduce,
    steps: u64,
    device: &candle_core::Device,
) -> anyhow::Result<StepTimes> {
    for _ in 0..10 {
        trainer.train_step(batch, reduce, device)?;
    }
    let mut t = StepTimes::default();
    let start = Instant::now();
    for _ in 0..steps {
        let r = trainer.train_step(batch, reduce, device)?;
        t.compute += r.timings.compute.as_secs_f64();
        t.reduce += r.timings.reduce.as_secs_f64();
        t.update += r.timings.update.as_secs_f64();
        t.loss = r.terms["loss"];
    }
    let n = steps as f64;
    t.seconds = start.elapsed().as_secs_f64() / n;
    t.compute /= n;
    t.reduce /= n;
    t.update /= n;
    Ok(t)
}

/// One process, on a fixed random binary batch.
fn bench_train(args: TrainBenchArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.steps == 0 {
        bail!("--batch-size and --steps must be positive");
    }
    if args.workers > 1 {
        return super::bench_ring::train(args.workers, args.batch_size, args.steps, args.json);
    }
    let device = super::build::device(&args.device)?;
    let mut trainer = reference_trainer(&device)?;
    let n = args.batch_size;
    let batch = fixed_batch(n, n, 0);
    let t = time_steps(&mut trainer, &batch, &mut LocalReduce, args.steps, &device)?;
    let report = TrainBenchReport {
        model: MODEL,
        batch_size: n,
        steps: args.steps,
        samples_per_s: n as f64 / t.seconds,
        ms_per_step: t.seconds * 1e3,
        ms_compute: t.compute * 1e3,
        ms_update: t.update * 1e3,
        final_loss: t.loss,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: batch {} — {:.0} samples/s, {:.3} ms/step (compute {:.3}, update {:.3}), loss {:.3}",
            report.model, report.batch_size, report.samples_per_s, report.ms_per_step, report.ms_compute, report.ms_update, report.final_loss
        );
    }
    Ok(())
}
