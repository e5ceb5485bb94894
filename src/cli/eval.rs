//! `elbo eval` and `elbo sample`: a trained run's test bounds and pictures.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Tensor;
use elbo_datasets::{BatchStream, Dataset};
use elbo_models::{iw_bound, ActiveUnits, Input, Model, Noise, Objective};
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

#[derive(Debug, Serialize)]
struct EvalReport {
    rows: u64,
    /// Single-sample −ELBO (nats per example).
    neg_elbo: f64,
    /// Reconstruction term.
    rec: f64,
    /// KL term.
    kl: f64,
    /// −(IWAE bound): an upper bound on the test NLL, tighter with more samples.
    nll_iw: f64,
    iw_samples: u32,
    active_units: usize,
    latent_dim: usize,
}

/// Memory budget of one IWAE decode, in rows (samples × batch).
const IW_MAX_ROWS: usize = 50_000;

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = build::device(&args.device)?;
    let (cfg, model, test) = load_model(&args.run_dir, &device)?;
    let test = match &args.data {
        Some(spec) => {
            let ds = std::sync::Arc::new(
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
    if k == 0 {
        anyhow::bail!("--iw-samples must be at least 1");
    }
    let plan = test.plan(
        cfg.run.seed,
        cfg.eval.batch_size,
        cfg.eval.batch_size,
        false,
    )?;
    let noise = Noise::new(cfg.run.seed ^ 0xe7a1);
    let (mut rows, mut sums) = (0u64, [0.0f64; 4]);
    let mut active = ActiveUnits::default();
    for batch in BatchStream::new(test.clone(), plan.plan(0, 1, 0)?, build::binarizer(&cfg), 1) {
        let batch = batch?;
        let n = batch.rows();
        let x = Tensor::from_slice(&batch.x, (n, batch.dim), &device)?;
        let input = Input {
            x: &x,
            labels: &batch.labels,
            ids: &batch.ids,
        };
        let out = model.loss(&input, &noise, 0, &Objective::default())?;
        for (s, key) in sums.iter_mut().zip(["neg_elbo", "rec", "kl"]) {
            *s += out.terms[key].to_scalar::<f32>()? as f64 * n as f64;
        }
        sums[3] -= iw_bound(&model, &input, &noise, k as usize, IW_MAX_ROWS)?
            .iter()
            .sum::<f64>();
        active.add(&model.posterior_mean(&input)?)?;
        rows += n as u64;
    }
    let mean = |s: f64| s / rows.max(1) as f64;
    let report = EvalReport {
        rows,
        neg_elbo: mean(sums[0]),
        rec: mean(sums[1]),
        kl: mean(sums[2]),
        nll_iw: mean(sums[3]),
        iw_samples: k,
        active_units: active.count(0.01),
        latent_dim: model.latent_dim(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("test rows      {}", report.rows);
        println!(
            "−ELBO          {:.3} nats (rec {:.3} + KL {:.3})",
            report.neg_elbo, report.rec, report.kl
        );
        println!(
            "NLL (IW, k={})  {:.3} nats",
            report.iw_samples, report.nll_iw
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
    if args.n == 0 {
        anyhow::bail!("--n must be at least 1");
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
