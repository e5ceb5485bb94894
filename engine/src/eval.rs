//! Evaluation of a model on test data, and loading a run's newest model for `elbo eval` and
//! `elbo sample`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use elbo_datasets::sprites::Split;
use elbo_datasets::{BatchStream, Cursor, Dataset};
use elbo_models::{EvalOptions, Input, Metric, Metrics, Model, Noise};
use elbo_settings::Config;
use elbo_worker::checkpoint;

use crate::build::{binarizer, step_config, Engine};
use crate::error::{data, EngineError, Result};

/// Most importance samples per example (each example keeps its k log-weights).
pub const MAX_IW_SAMPLES: u32 = 100_000;

/// Memory budget of one importance-weighted decode, in rows (samples × batch).
const IW_MAX_ROWS: usize = 50_000;

/// Evaluates `model` on the whole of `test`, in file order: whatever figures the model
/// reports (with the IW bound when `iw_samples` is given), and `rows`.
pub fn evaluate(
    model: &dyn Model,
    test: &Arc<Dataset>,
    cfg: &Config,
    device: &Device,
    iw_samples: Option<u32>,
) -> Result<Metrics> {
    let plan = test
        .plan(
            cfg.run.seed,
            cfg.eval.batch_size,
            cfg.eval.batch_size,
            false,
        )
        .map_err(data("cannot plan the test data"))?;
    let noise = Noise::new(cfg.run.seed ^ 0xe7a1);
    let mut evaluator = model.evaluator(EvalOptions {
        noise: &noise,
        iw_samples: iw_samples.map(|k| k as usize),
        max_rows: IW_MAX_ROWS,
    })?;
    let mut rows = 0u64;
    let epoch = plan
        .plan(0, 1, 0)
        .map_err(data("cannot plan the test data"))?;
    for batch in BatchStream::new(test.clone(), epoch, binarizer(cfg), 1) {
        let batch = batch.map_err(data("cannot read the test data"))?;
        let x = Tensor::from_slice(&batch.x, (batch.rows(), batch.dim), device)?;
        evaluator.add(&Input {
            x: &x,
            labels: &batch.labels,
            ids: &batch.ids,
        })?;
        rows += batch.rows() as u64;
    }
    let mut figures = evaluator.finish();
    figures.insert("rows".into(), Metric::Count(rows));
    Ok(figures)
}

/// Whether a run evaluates its test figures after global step `step`, its data cursor then at
/// `cursor`: every `eval.every` steps, or at each epoch's end when that is 0, and after the run's
/// last step (whose figures are the run's result).
pub(crate) fn test_due(cfg: &Config, step: u64, cursor: Cursor, total_steps: u64) -> bool {
    let every = cfg.eval.every;
    step > 0
        && (step >= total_steps
            || if every > 0 {
                step % every == 0
            } else {
                cursor.step == 0
            })
}

/// The figures of an evaluation during training: `model`'s on the whole of `test`, on the
/// model's device, without the IW bound.
pub(crate) fn test_figures(
    model: &dyn Model,
    test: &Arc<Dataset>,
    cfg: &Config,
) -> Result<Metrics> {
    let device = model.params().device().clone();
    evaluate(model, test, cfg, &device, None)
}

/// The scalar figures (values and counts) of an evaluation.
pub(crate) fn scalars(figures: &Metrics) -> BTreeMap<String, f64> {
    figures
        .iter()
        .filter_map(|(name, m)| match m {
            Metric::Value(v) => Some((name.clone(), *v)),
            Metric::Count(n) => Some((name.clone(), *n as f64)),
            Metric::List(_) => None,
        })
        .collect()
}

/// The metrics record of test figures after global step `step`: `test_<name>` keys.
pub(crate) fn test_record(
    step: u64,
    epoch: u64,
    figures: &BTreeMap<String, f64>,
) -> serde_json::Value {
    let mut rec = serde_json::json!({"step": step, "epoch": epoch});
    for (name, v) in figures {
        rec[format!("{TEST_PREFIX}{name}")] = serde_json::json!(v);
    }
    rec
}

/// What test figures' keys start with in metrics.jsonl.
pub const TEST_PREFIX: &str = "test_";

/// A trained run's config, its newest model and its test data.
pub struct TrainedRun {
    /// The config it was trained with.
    pub cfg: Config,
    /// The model at its newest checkpoint.
    pub model: Box<dyn Model>,
    /// Its test data.
    pub test: Arc<Dataset>,
}

/// Loads the newest checkpoint of a run into a fresh model of its config.
pub fn load_run(engine: &Engine, run_dir: &Path, device: &Device) -> Result<TrainedRun> {
    let cfg = engine.run_config(run_dir)?;
    let test = engine.dataset(&cfg, Split::Test)?;
    let model = engine.model(&cfg, test.schema(), device)?;
    let (newest, files) = checkpoint::newest(run_dir)?.ok_or_else(|| {
        EngineError::Invalid(format!("{} has no checkpoint yet", run_dir.display()))
    })?;
    let mut trainer = elbo_worker::Trainer::new(model, step_config(&cfg, 1))?;
    let ck = trainer.decode(&files, &newest)?;
    trainer.restore(ck)?;
    Ok(TrainedRun {
        cfg,
        model: trainer.into_model(),
        test,
    })
}
