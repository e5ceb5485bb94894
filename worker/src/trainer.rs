//! The training step: loss and gradients with candle, gradients and loss terms packed into one
//! flat buffer, a pluggable reduction (identity in one process, the all-reduce later), a guard
//! against non-finite steps, clipping, and the flat optimiser update written back to the model.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use elbo_datasets::Batch;
use elbo_models::{Input, Model, Noise, Objective};

use crate::error::{Result, WorkerError};
use crate::flat::FlatLayout;
use crate::optim::{
    clip_grad_norm, global_norm, Optimizer, OptimizerConfig, OptimizerState, Schedule,
};

/// How gradients (and the statistics appended to them) are combined across workers.
pub trait Reduce {
    /// Number of workers taking part.
    fn world(&self) -> u32;
    /// Replaces `buf` with the element-wise mean of every worker's `buf`. Taken as a `Vec` so
    /// that a reduction may move it to the thread that does its network I/O (and back).
    fn all_reduce_mean(&mut self, buf: &mut Vec<f32>) -> Result<()>;
}

/// The reduction of a single process: nothing to combine.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReduce;

impl Reduce for LocalReduce {
    fn world(&self) -> u32 {
        1
    }

    fn all_reduce_mean(&mut self, _buf: &mut Vec<f32>) -> Result<()> {
        Ok(())
    }
}

/// Settings of the training step.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    /// The objective.
    pub objective: Objective,
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Clip gradients to this global norm (0 = off).
    pub clip_norm: f64,
    /// Stop after this many non-finite steps in a row.
    pub max_nonfinite: u32,
    /// Run seed (keys the noise).
    pub seed: u64,
}

/// Time spent in the parts of a step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Forward and backward pass, gradient packing.
    pub compute: Duration,
    /// The reduction.
    pub reduce: Duration,
    /// Clipping, the optimiser and the write-back.
    pub update: Duration,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The global step this was (0-based).
    pub step: u64,
    /// False when the step was skipped as non-finite.
    pub applied: bool,
    /// Loss terms, averaged over the global batch.
    pub terms: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Where the time went.
    pub timings: Timings,
}

/// A model with its flat parameters and optimiser.
pub struct Trainer {
    model: Box<dyn Model>,
    layout: FlatLayout,
    params: Vec<f32>,
    buf: Vec<f32>,
    optimizer: Optimizer,
    config: StepConfig,
    noise: Noise,
    step: u64,
    nonfinite_in_row: u32,
    nonfinite_total: u64,
    term_names: Vec<&'static str>,
}

impl Trainer {
    /// Wraps a freshly built model.
    pub fn new(model: Box<dyn Model>, config: StepConfig) -> Result<Self> {
        config.objective.validate()?;
        let lr_ok = config.lr.is_finite() && config.lr > 0.0;
        let clip_ok = config.clip_norm.is_finite() && config.clip_norm >= 0.0;
        if !lr_ok || !clip_ok || config.max_nonfinite == 0 {
            return Err(WorkerError::Invalid(format!(
                "learning rate {} must be positive, clip norm {} ≥ 0, max non-finite steps ≥ 1",
                config.lr, config.clip_norm
            )));
        }
        model.params().enable_grad_sink();
        let layout = FlatLayout::new(model.params().vars());
        let mut params = vec![0.0; layout.len()];
        layout.read_params(&mut params)?;
        let optimizer = Optimizer::new(config.optimizer, layout.len())?;
        Ok(Trainer {
            buf: vec![0.0; layout.len()],
            model,
            layout,
            params,
            optimizer,
            noise: Noise::new(config.seed),
            config,
            step: 0,
            nonfinite_in_row: 0,
            nonfinite_total: 0,
            term_names: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The parameter layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The flat parameters (the optimiser's master copy).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Steps taken (applied or skipped).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps skipped as non-finite so far.
    pub fn nonfinite_total(&self) -> u64 {
        self.nonfinite_total
    }

    /// Restores parameters, optimiser state and counters from a checkpoint.
    pub fn restore(
        &mut self,
        params: Vec<f32>,
        optimizer: OptimizerState,
        step: u64,
        nonfinite_total: u64,
    ) -> Result<()> {
        if params.len() != self.layout.len() {
            return Err(WorkerError::Invalid(format!(
                "{} parameters restored, the model has {}",
                params.len(),
                self.layout.len()
            )));
        }
        self.optimizer.restore(optimizer)?;
        self.layout.write_params(&params)?;
        self.params = params;
        self.step = step;
        self.nonfinite_total = nonfinite_total;
        self.nonfinite_in_row = 0;
        Ok(())
    }

    /// One training step on this worker's part of a global batch.
    pub fn train_step(
        &mut self,
        batch: &Batch,
        reduce: &mut dyn Reduce,
        device: &Device,
    ) -> Result<StepReport> {
        let start = Instant::now();
        let rows = batch.rows();
        let n = self.layout.len();
        if rows == 0 {
            // A rank with no rows in this (short, final) batch contributes nothing to the sums.
            if self.term_names.is_empty() {
                return Err(WorkerError::Invalid(
                    "the first batch of a run left this rank without rows: train.batch_size must be at least the number of workers".into(),
                ));
            }
            self.buf.iter_mut().for_each(|v| *v = 0.0);
        } else {
            self.compute(batch, device)?;
        }
        // Each worker holds the mean over its rows; weighting by its share of the global batch
        // (× world, undone by the mean) makes the reduced buffer the global-batch mean.
        let weight =
            (rows as f64 * f64::from(reduce.world()) / batch.global_rows.max(1) as f64) as f32;
        if weight != 1.0 {
            self.buf.iter_mut().for_each(|v| *v *= weight);
        }
        let computed = Instant::now();
        reduce.all_reduce_mean(&mut self.buf)?;
        let reduced = Instant::now();
        let terms: BTreeMap<String, f64> = self
            .term_names
            .iter()
            .zip(&self.buf[n..])
            .map(|(k, v)| (k.to_string(), f64::from(*v)))
            .collect();
        let step = self.step;
        self.step += 1;
        let lr = self.config.schedule.lr(self.config.lr, step);
        let grad_norm = global_norm(&self.buf[..n]);
        if let Some(what) = self.non_finite(&terms, grad_norm) {
            self.nonfinite_in_row += 1;
            self.nonfinite_total += 1;
            tracing::warn!(step, what, "non-finite step skipped");
            if self.nonfinite_in_row >= self.config.max_nonfinite {
                return Err(WorkerError::NonFinite {
                    count: self.nonfinite_in_row,
                    step,
                    what,
                });
            }
            let timings = Timings {
                compute: computed - start,
                reduce: reduced - computed,
                update: Duration::ZERO,
            };
            return Ok(StepReport {
                step,
                applied: false,
                terms,
                grad_norm: f64::NAN,
                lr,
                timings,
            });
        }
        self.nonfinite_in_row = 0;
        clip_grad_norm(&mut self.buf[..n], grad_norm, self.config.clip_norm);
        self.optimizer.step(&mut self.params, &self.buf[..n], lr);
        self.layout.write_params(&self.params)?;
        let timings = Timings {
            compute: computed - start,
            reduce: reduced - computed,
            update: reduced.elapsed(),
        };
        Ok(StepReport {
            step,
            applied: true,
            terms,
            grad_norm,
            lr,
            timings,
        })
    }

    /// Forward and backward on this rank's rows: gradients and loss terms into the buffer.
    fn compute(&mut self, batch: &Batch, device: &Device) -> Result<()> {
        let x = Tensor::from_slice(&batch.x, (batch.rows(), batch.dim), device)?;
        let input = Input {
            x: &x,
            labels: &batch.labels,
            ids: &batch.ids,
        };
        self.model.params().grad_sink().begin_step();
        let out = self
            .model
            .loss(&input, &self.noise, self.step, &self.config.objective)?;
        let grads = out.loss.backward()?;
        let n = self.layout.len();
        if self.term_names.is_empty() {
            self.term_names = out.terms.keys().copied().collect();
            self.buf.resize(n + self.term_names.len(), 0.0);
        }
        let sink = self.model.params().grad_sink();
        self.layout.read_grads(sink, &grads, &mut self.buf[..n])?;
        for (slot, name) in self.buf[n..].iter_mut().zip(&self.term_names) {
            let term = out
                .terms
                .get(name)
                .ok_or_else(|| WorkerError::Internal(format!("loss term {name} missing")))?;
            *slot = term.to_scalar::<f32>()?;
        }
        Ok(())
    }

    /// Names what is non-finite: loss terms first, then the first parameter with a bad gradient
    /// (searched only when the gradient norm says there is one).
    fn non_finite(&self, terms: &BTreeMap<String, f64>, grad_norm: f64) -> Option<String> {
        let bad: Vec<&str> = terms
            .iter()
            .filter(|(_, v)| !v.is_finite())
            .map(|(k, _)| k.as_str())
            .collect();
        if !bad.is_empty() {
            return Some(format!("loss terms {}", bad.join(", ")));
        }
        if grad_norm.is_finite() {
            return None;
        }
        self.layout
            .slots()
            .iter()
            .find(|s| {
                self.buf[s.offset..s.offset + s.len]
                    .iter()
                    .any(|g| !g.is_finite())
            })
            .map(|s| format!("gradient of {}", s.name))
            .or_else(|| Some("gradient norm".into()))
    }
}
