//! Throughput measurements in one process: `elbo bench data` (the reader) and the timing of
//! full training steps of the reference MLP VAE that `elbo bench train` runs here or in each
//! rank process (`bench_ring.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use elbo_datasets::{
    checked_numel, join_shape, Batch, BatchStream, Binarize, Binarizer, Cursor, DataSchema,
    Dataset, DatasetWriter, PixelSlice, PixelType, Rows, WriterSpec, DEFAULT_ROW_GROUP_SIZE,
};
use elbo_models::{Activation, Architecture, LabelUse, LikelihoodKind, ModelSpec, Objective, Vae};
use elbo_settings::{Layers, OptimizerKind};
use elbo_worker::{LocalReduce, OptimizerConfig, Reduce, Schedule, StepConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::build::{device, step_config, Engine};
use crate::error::{data, io, EngineError, Result};

/// The benchmark model, as reports name it.
pub const MODEL: &str = "mlp-vae 784-400-20 bernoulli adam";

/// A model `elbo bench train` times from a config: the config's layers (file and `--set`
/// flags, which rank processes are started with too) and the shape of the synthetic examples.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// A TOML config file.
    pub file: Option<PathBuf>,
    /// `KEY=VALUE` overrides.
    pub set: Vec<String>,
    /// Example shape, e.g. `[1, 28, 28]`.
    pub shape: Vec<usize>,
}

/// What `elbo bench train` times.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// The model a config describes; `None`: the reference MLP VAE 784-400-20 of
    /// `torch_vae_step.py`.
    pub config: Option<BenchConfig>,
    /// Worker processes, each training its share of the batch, joined by the ring all-reduce.
    pub workers: u32,
    /// Batch size (global, over all workers).
    pub batch_size: usize,
    /// Timed steps (after 10 warm-up steps).
    pub steps: u64,
    /// Device: `cpu` or `cuda:N`.
    pub device: String,
    /// The `elbo` executable (started as `elbo bench rank` for each worker).
    pub exe: PathBuf,
    /// The workers' ring over TLS (off when its files are empty).
    pub tls: elbo_settings::TlsConfig,
}

/// Full training steps, timed.
#[derive(Debug, Serialize)]
pub struct TrainBenchReport {
    /// The model.
    pub model: String,
    /// Worker processes.
    pub workers: u32,
    /// Global batch size.
    pub batch_size: usize,
    /// Timed steps.
    pub steps: u64,
    /// Global batch rows per second.
    pub samples_per_s: f64,
    /// Milliseconds per step.
    pub ms_per_step: f64,
    /// Mean milliseconds per step in forward + backward + gradient packing (slowest rank).
    pub ms_compute: f64,
    /// Mean milliseconds per step in the all-reduce (slowest rank).
    pub ms_reduce: f64,
    /// Mean milliseconds per step in clipping, the optimiser and the write-back (slowest rank).
    pub ms_update: f64,
    /// The loss of the last step.
    pub final_loss: f64,
}

/// What `elbo bench data` streams.
#[derive(Debug, Clone)]
pub struct DataBench {
    /// Dataset to stream; `None`: a synthetic MNIST-sized file generated once into `cache`.
    pub file: Option<String>,
    /// Rows of the synthetic file.
    pub rows: u64,
    /// Batch size.
    pub batch_size: u64,
    /// Shuffle window in rows.
    pub shuffle_window: u64,
    /// Decoder threads.
    pub decode_threads: usize,
    /// Epochs to time (the best is reported).
    pub repeats: u32,
    /// Where the synthetic file is cached.
    pub cache: PathBuf,
}

/// A dataset streamed into batches, timed.
#[derive(Debug, Serialize)]
pub struct DataBenchReport {
    /// The file.
    pub file: String,
    /// Rows per epoch.
    pub rows: u64,
    /// Values per row.
    pub dim: usize,
    /// Batch size.
    pub batch_size: u64,
    /// Decoder threads.
    pub decode_threads: usize,
    /// The best epoch's seconds.
    pub seconds: f64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Megabytes (10^6) of stored example values (uint8: one byte each) per second.
    pub mb_per_s: f64,
    /// Peak resident memory while streaming (VmHWM after a reset), in MiB.
    pub peak_rss_mib: Option<f64>,
}

fn synthetic_file(rows: u64, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(format!(
        "cannot create cache directory {}",
        dir.display()
    )))?;
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
    let what = format!("cannot write {}", path.display());
    let mut writer = DatasetWriter::create(&path, spec).map_err(data(what.clone()))?;
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
        writer
            .write(Rows {
                x: PixelSlice::Uint8(&x),
                labels: Some(&labels),
                ids: Some(&ids),
                extra: &[],
            })
            .map_err(data(what.clone()))?;
        start += n;
    }
    writer.finish().map_err(data(what))?;
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

/// `elbo bench data`.
pub fn data_bench(args: &DataBench) -> Result<DataBenchReport> {
    if args.batch_size == 0
        || args.shuffle_window == 0
        || args.repeats == 0
        || args.rows == 0
        || args.decode_threads == 0
    {
        return Err(EngineError::Invalid(
            "--rows, --batch-size, --shuffle-window, --decode-threads and --repeats must be positive"
                .into(),
        ));
    }
    let file = match &args.file {
        Some(f) => f.clone(),
        None => synthetic_file(args.rows, &args.cache)?
            .to_string_lossy()
            .into_owned(),
    };
    let ds = Arc::new(Dataset::open(&file).map_err(data(format!("cannot open {file}")))?);
    let plan = ds
        .plan(0, args.batch_size, args.shuffle_window, true)
        .map_err(data(format!("cannot plan {file}")))?;
    let binarizer = Binarizer::new(Binarize::None, 0);
    let have_peak = reset_peak_rss();
    let mut best = f64::INFINITY;
    for epoch in 0..u64::from(args.repeats) {
        let start = Instant::now();
        let mut rows = 0u64;
        let mut checksum = 0f32;
        let order = plan
            .plan(epoch, 1, 0)
            .map_err(data(format!("cannot plan {file}")))?;
        for batch in BatchStream::new(ds.clone(), order, binarizer, args.decode_threads) {
            let batch = batch.map_err(data(format!("cannot read {file}")))?;
            rows += batch.rows() as u64;
            checksum += batch.x[0];
        }
        let secs = start.elapsed().as_secs_f64();
        if rows != ds.rows() {
            return Err(EngineError::Failed(format!(
                "streamed {rows} rows of {}",
                ds.rows()
            )));
        }
        tracing::debug!(epoch, secs, checksum, "streamed one epoch");
        best = best.min(secs);
    }
    let dim = ds.schema().dim;
    let bytes_per_value = match ds.schema().pixel {
        PixelType::Uint8 => 1.0,
        PixelType::Float32 => 4.0,
    };
    Ok(DataBenchReport {
        file,
        rows: ds.rows(),
        dim,
        batch_size: args.batch_size,
        decode_threads: args.decode_threads,
        seconds: best,
        rows_per_s: ds.rows() as f64 / best,
        mb_per_s: ds.rows() as f64 * dim as f64 * bytes_per_value / best / 1e6,
        peak_rss_mib: if have_peak { peak_rss_mib() } else { None },
    })
}

/// The reference MLP VAE of `../shared/reference/torch_vae_step.py`: 784-400-20, ReLU,
/// Bernoulli likelihood, analytic KL, Adam at 1e-3.
fn reference_trainer(device: &candle_core::Device) -> Result<Trainer> {
    let spec = ModelSpec {
        input_shape: vec![784],
        latent_dim: 20,
        architecture: Architecture::Mlp,
        hidden: vec![400],
        activation: Activation::Relu,
        likelihood: LikelihoodKind::Bernoulli,
        variance: 1.0,
        log_var_clamp: 30.0,
        objective: Objective::default(),
    };
    let model = Vae::new(spec, device, 0)?;
    let config = StepConfig {
        optimizer: OptimizerConfig::defaults(OptimizerKind::Adam),
        lr: 1e-3,
        schedule: Schedule::constant(),
        clip_norm: 0.0,
        max_nonfinite: 10,
        seed: 0,
    };
    Ok(Trainer::new(Box::new(model), config)?)
}

/// The trainer of the benchmark's model, its name, its example size and what it needs of
/// labels.
pub(crate) fn bench_trainer(
    engine: &Engine,
    config: Option<&BenchConfig>,
    steps: u64,
    device: &candle_core::Device,
) -> Result<(Trainer, String, usize, LabelUse)> {
    let Some(bench) = config else {
        return Ok((
            reference_trainer(device)?,
            MODEL.to_string(),
            784,
            LabelUse::Ignored,
        ));
    };
    let dim = checked_numel(&bench.shape)
        .filter(|d| *d > 0)
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "--shape {:?}: expected positive sizes",
                bench.shape
            ))
        })?;
    let cfg = engine.load_config(&Layers {
        file: bench.file.clone(),
        flags: bench.set.clone(),
        ..Default::default()
    })?;
    let schema = DataSchema {
        shape: bench.shape.clone(),
        dim,
        pixel: PixelType::Uint8,
        has_label: true,
        has_id: true,
    };
    let model = engine.model(&cfg, &schema, device)?;
    let labels = model.labels();
    let name = bench_name(&cfg, &bench.shape, model.params().numel());
    let trainer = Trainer::new(model, step_config(&cfg, steps))?;
    Ok((trainer, name, dim, labels))
}

/// How a report names a configured model: kind, example shape, trunk, its parameter count (a
/// variant may size its layers in its own section, so `model.hidden` would not say), latent,
/// likelihood.
fn bench_name(cfg: &elbo_settings::Config, shape: &[usize], params: usize) -> String {
    let m = &cfg.model;
    format!(
        "{} {} {:?} {params} params z {} {:?}",
        m.kind,
        join_shape(shape),
        m.architecture,
        m.latent_dim,
        m.likelihood
    )
    .to_lowercase()
}

/// Rows `lo..hi` of a fixed random binary global batch of `global_rows` examples of `dim`
/// values: each row drawn from its index in the global batch, so every split of it across ranks
/// holds the same rows. Labels as the model needs them: random classes for a conditional model,
/// on the first half of the global batch for a semi-supervised one.
pub(crate) fn fixed_batch(
    lo: u64,
    hi: u64,
    global_rows: u64,
    dim: usize,
    labels: LabelUse,
) -> Batch {
    let mut x = Vec::with_capacity((hi - lo) as usize * dim);
    let mut classes = Vec::with_capacity((hi - lo) as usize);
    for row in lo..hi {
        let mut rng = ChaCha8Rng::seed_from_u64(row);
        x.extend((0..dim).map(|_| if rng.random::<f32>() > 0.5 { 1.0 } else { 0.0 }));
        classes.push(match labels {
            LabelUse::Ignored => None,
            LabelUse::Every { classes } => Some(rng.random_range(0..classes as i64)),
            LabelUse::Partial { classes } => {
                (row < global_rows / 2).then(|| rng.random_range(0..classes as i64))
            }
        });
    }
    Batch {
        x,
        dim,
        labels: classes,
        ids: (lo..hi).collect(),
        global_rows,
        cursor_after: Cursor::start(0),
    }
}

/// Mean seconds per step and per part over timed steps (after 10 warm-up steps).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub(crate) struct StepTimes {
    pub seconds: f64,
    pub compute: f64,
    pub reduce: f64,
    pub update: f64,
    pub loss: f64,
}

/// Runs 10 warm-up steps, then `steps` timed ones.
pub(crate) fn time_steps(
    trainer: &mut Trainer,
    batch: &Batch,
    reduce: &mut dyn Reduce,
    steps: u64,
    device: &candle_core::Device,
) -> Result<StepTimes> {
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
    // A GPU may still be running the last step's update.
    device.synchronize()?;
    let n = steps as f64;
    t.seconds = start.elapsed().as_secs_f64() / n;
    t.compute /= n;
    t.reduce /= n;
    t.update /= n;
    Ok(t)
}

/// `elbo bench train` in one process, on a fixed random binary batch.
pub(crate) fn train_here(engine: &Engine, args: &TrainBench) -> Result<TrainBenchReport> {
    let device = device(&args.device)?;
    let (mut trainer, model, dim, labels) =
        bench_trainer(engine, args.config.as_ref(), args.steps, &device)?;
    let n = args.batch_size;
    let batch = fixed_batch(0, n as u64, n as u64, dim, labels);
    let t = time_steps(&mut trainer, &batch, &mut LocalReduce, args.steps, &device)?;
    Ok(TrainBenchReport {
        model,
        workers: 1,
        batch_size: n,
        steps: args.steps,
        samples_per_s: n as f64 / t.seconds,
        ms_per_step: t.seconds * 1e3,
        ms_compute: t.compute * 1e3,
        ms_reduce: t.reduce * 1e3,
        ms_update: t.update * 1e3,
        final_loss: t.loss,
    })
}
