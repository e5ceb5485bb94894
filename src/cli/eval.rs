//! `elbo eval` and `elbo sample`: a trained run's test bounds and pictures.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use elbo_datasets::{BatchStream, Dataset};
use elbo_models::{iw_bound, ActiveUnits, Input, Model, Noise, Objective};
use elbo_settings::Config;
use serde::Serialize;

use super::build;
use super::pictures::{self, ImageShape};
use super::train::load_model;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The run directory.
    #[arg(long)]
    run_dir: PathBuf,
    /// Test data (default: the run's data.test).
    #[arg(long)]
    data: Option<String>,
    /// Importance samples of the IWAE bound (default: the run's eval.iw_samples).
    #[arg(long)]
    iw_samples: Option<u32>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Test-set figures of a model.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    rows: u64,
    /// Single-sample −ELBO (nats per example).
    pub neg_elbo: f64,
    /// Reconstruction term.
    rec: f64,
    /// KL term.
    kl: f64,
    /// −(IWAE bound): an upper bound on the test NLL, tighter with more samples.
    nll_iw: Option<f64>,
    iw_samples: Option<u32>,
    active_units: usize,
    latent_dim: usize,
}

/// Most importance samples per example (each example keeps its k log-weights).
const MAX_IW_SAMPLES: u32 = 100_000;
/// Most samples `elbo sample` draws into one picture.
const MAX_SAMPLES: usize = 4096;

/// Memory budget of one IWAE decode, in rows (samples × batch).
const IW_MAX_ROWS: usize = 50_000;

/// Evaluates `model` on the whole of `test`, in file order: −ELBO and its terms, active units,
/// and the IWAE bound when `iw_samples` is given.
pub fn evaluate(
    model: &dyn Model,
    test: &Arc<Dataset>,
    cfg: &Config,
    device: &Device,
    iw_samples: Option<u32>,
) -> anyhow::Result<EvalReport> {
    let plan = test.plan(
        cfg.run.seed,
        cfg.eval.batch_size,
        cfg.eval.batch_size,
        false,
    )?;
    let noise = Noise::new(cfg.run.seed ^ 0xe7a1);
    let (mut rows, mut sums, mut nll) = (0u64, [0.0f64; 3], 0.0f64);
    let mut active = ActiveUnits::default();
    for batch in BatchStream::new(test.clone(), plan.plan(0, 1, 0)?, build::binarizer(cfg), 1) {
        let batch = batch?;
        let n = batch.rows();
        let x = Tensor::from_slice(&batch.x, (n, batch.dim), device)?;
        let input = Input {
            x: &x,
            labels: &batch.labels,
            ids: &batch.ids,
        };
        let out = model.loss(&input, &noise, 0, &Objective::default())?;
        for (s, key) in sums.iter_mut().zip(["neg_elbo", "rec", "kl"]) {
            *s += out.terms[key].to_scalar::<f32>()? as f64 * n as f64;
        }
        if let Some(k) = iw_samples {
            nll -= iw_bound(model, &input, &noise, k as usize, IW_MAX_ROWS)?
                .iter()
                .sum::<f64>();
        }
        active.add(&model.posterior_mean(&input)?)?;
        rows += n as u64;
    }
    let mean = |s: f64| s / rows.max(1) as f64;
    Ok(EvalReport {
        rows,
        neg_elbo: mean(sums[0]),
        rec: mean(sums[1]),
        kl: mean(sums[2]),
        nll_iw: iw_samples.map(|_| mean(nll)),
        iw_samples,
        active_units: active.count(0.01),
        latent_dim: model.latent_dim(),
    })
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = build::device(&args.device)?;
    let (cfg, model, test) = load_model(&args.run_dir, &device)?;
    let test = match &args.data {
        Some(spec) => {
            let ds = Arc::new(
                Dataset::open(spec).with_context(|| format!("cannot open --data {spec}"))?,
            );
            if ds.schema().shape != test.schema().shape {
                anyhow::bail!(
                    "--data holds examples of shape {:?}, the model takes {:?}",
                    ds.schema().shape,
                    test.schema().shape
                );
            }
            ds
        }
        None => test,
    };
    let k = args.iw_samples.unwrap_or(cfg.eval.iw_samples);
    if !(1..=MAX_IW_SAMPLES).contains(&k) {
        anyhow::bail!("--iw-samples {k}: expected 1 to {MAX_IW_SAMPLES}");
    }
    let report = evaluate(&model, &test, &cfg, &device, Some(k))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("test rows      {}", report.rows);
        println!(
            "−ELBO          {:.3} nats (rec {:.3} + KL {:.3})",
            report.neg_elbo, report.rec, report.kl
        );
        println!(
            "NLL (IW, k={k})  {:.3} nats",
            report.nll_iw.unwrap_or(f64::NAN)
        );
        println!(
            "active units   {} of {}",
            report.active_units, report.latent_dim
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// The run directory.
    #[arg(long)]
    run_dir: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the prior draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn sample(args: SampleArgs) -> anyhow::Result<()> {
    if !(1..=MAX_SAMPLES).contains(&args.n) {
        anyhow::bail!("--n {}: expected 1 to {MAX_SAMPLES}", args.n);
    }
    let device = build::device(&args.device)?;
    let (_, model, test) = load_model(&args.run_dir, &device)?;
    let shape = ImageShape::of(&test.schema().shape)?;
    let cols = (args.n as f64).sqrt().ceil() as usize;
    pictures::grid(
        &pictures::samples(&model, args.n, args.seed, &device)?,
        shape,
        cols,
        &args.out,
    )?;
    println!("wrote {} samples to {}", args.n, args.out.display());
    Ok(())
}
