//! `elbo eval` and `elbo sample`: a trained run's test figures and pictures.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use elbo_datasets::Dataset;
use elbo_engine::{device, evaluate, load_run, write_samples, Engine, MAX_IW_SAMPLES};
use elbo_models::Metric;

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

pub fn eval(engine: &Engine, args: EvalArgs) -> anyhow::Result<()> {
    let device = device(&args.device)?;
    let run = load_run(engine, &args.run_dir, &device)?;
    let test = match &args.data {
        Some(spec) => {
            let ds = Arc::new(
                Dataset::open(spec).with_context(|| format!("cannot open --data {spec}"))?,
            );
            if ds.schema().shape != run.test.schema().shape {
                bad!(
                    "--data holds examples of shape {:?}, the model takes {:?}",
                    ds.schema().shape,
                    run.test.schema().shape
                );
            }
            ds
        }
        None => run.test.clone(),
    };
    let k = args.iw_samples.unwrap_or(run.cfg.eval.iw_samples);
    if !(1..=MAX_IW_SAMPLES).contains(&k) {
        bad!("--iw-samples {k}: expected 1 to {MAX_IW_SAMPLES}");
    }
    let figures = evaluate(run.model.as_ref(), &test, &run.cfg, &device, Some(k))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let width = figures.keys().map(|k| k.chars().count()).max().unwrap_or(0);
    for (name, value) in &figures {
        let shown = match value {
            Metric::Count(n) => n.to_string(),
            Metric::Value(v) => figure(*v),
            Metric::List(values) => values
                .iter()
                .map(|v| figure(*v))
                .collect::<Vec<_>>()
                .join(" "),
        };
        println!("{name:<width$} {shown}");
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
    /// Draw every sample of this class (models that read labels; without it, one row per
    /// class).
    #[arg(long)]
    label: Option<i64>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn sample(engine: &Engine, args: SampleArgs) -> anyhow::Result<()> {
    let device = device(&args.device)?;
    let run = load_run(engine, &args.run_dir, &device)?;
    let drawn = write_samples(&run, args.n, args.seed, args.label, &args.out, &device)?;
    println!("wrote {drawn} samples to {}", args.out.display());
    Ok(())
}

/// A figure with three decimals, or three significant digits when it is smaller than 0.01
/// (a commitment or an MSE would read 0.000).
fn figure(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.3e}")
    } else {
        format!("{v:.3}")
    }
}
