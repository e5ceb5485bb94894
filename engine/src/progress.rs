//! What a run shows while it trains, in one process or many: the progress bar (or log lines
//! when stderr is not a terminal) and the metrics records with their throughput window.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// The run's progress bar on a terminal (hidden otherwise: log lines take its place).
pub fn bar(total: u64, done: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    bar
}

/// One step as a metrics record sees it.
pub struct StepLine<'a> {
    /// Global steps taken.
    pub step: u64,
    /// Epoch of the data cursor after the step.
    pub epoch: u64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Loss terms of the global batch.
    pub terms: &'a BTreeMap<String, f64>,
}

/// Throughput and skipped steps since the last record. The clock starts when the run's first
/// step ends (when that step started is not known here), so that step's rows are not counted.
#[derive(Default)]
pub struct Window {
    rows: u64,
    skipped: u64,
    started: Option<Instant>,
}

impl Window {
    /// Counts a step of `rows` rows.
    pub fn add(&mut self, rows: u64, applied: bool) {
        self.skipped += u64::from(!applied);
        if self.started.is_none() {
            self.started = Some(Instant::now());
        } else {
            self.rows += rows;
        }
    }

    /// The metrics record of a step: its own terms (deterministic, so a resumed run logs what an
    /// uninterrupted one does) and the throughput and skipped steps since the last record.
    pub fn record(&mut self, s: &StepLine<'_>) -> serde_json::Value {
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let mut rec = json!({"step": s.step, "epoch": s.epoch, "lr": s.lr,
            "skipped": self.skipped, "grad_norm": s.grad_norm,
            "samples_per_s": if secs > 0.0 { self.rows as f64 / secs } else { 0.0 }});
        for (k, v) in s.terms {
            rec[k] = json!(v);
        }
        *self = Window {
            started: Some(Instant::now()),
            ..Window::default()
        };
        rec
    }
}

/// Shows a record: on the bar, or as a log line when there is no bar. The bar shows the
/// objective, and −ELBO and KL for the models that report them.
pub fn show(bar: &ProgressBar, rec: &serde_json::Value, suffix: &str) {
    let mut terms = format!("loss {:.2}", rec["loss"].as_f64().unwrap_or(f64::NAN));
    for (key, label) in [("neg_elbo", "−ELBO"), ("kl", "KL")] {
        if let Some(v) = rec[key].as_f64() {
            terms += &format!("  {label} {v:.2}");
        }
    }
    bar.set_message(format!(
        "epoch {}  {terms}  {:.0} samples/s{suffix}",
        rec["epoch"].as_u64().unwrap_or(0) + 1,
        rec["samples_per_s"].as_f64().unwrap_or(0.0)
    ));
    if bar.is_hidden() {
        tracing::info!("{rec}");
    }
}
