//! The training step: loss and gradients with candle, gradients, reported terms and state
//! statistics packed into one flat buffer, a pluggable reduction (identity in one process, the
//! ring all-reduce across workers), a guard against non-finite steps, clipping, the flat
//! optimiser update written back to the model, and the model's state update.
//!
//! The buffer holds *sums* (the model's contract, `elbo_models::Model`): gradients of this
//! rank's share of the global objective, then `(sum, count)` of each reported term, then the
//! model's update statistics. One all-reduce sums them over the ranks; every division and every
//! non-linear function of them happens after it, so a step at world N equals a step at world 1
//! up to summation order. A model that needs global batch statistics before its loss gets them
//! from a small all-reduce of their own first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use elbo_datasets::{Batch, Cursor};
use elbo_models::{Input, Model, Noise, Statistics, StepContext};

use crate::checkpoint::{self, Checkpoint, Files, ModelTensors, TrainState};
use crate::error::{Result, WorkerError};
use crate::flat::FlatLayout;
use crate::optim::{clip_grad_norm, global_norm, Optimizer, OptimizerConfig, Schedule};

/// How gradients (and the statistics appended to them) are combined across workers.
pub trait Reduce {
    /// Number of workers taking part.
    fn world(&self) -> u32;
    /// Replaces `buf` with the element-wise sum of every worker's `buf`. Taken as a `Vec` so
    /// that a reduction may move it to the thread that does its network I/O (and back).
    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> Result<()>;
}

/// The reduction of a single process: nothing to combine.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReduce;

impl Reduce for LocalReduce {
    fn world(&self) -> u32 {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut Vec<f32>) -> Result<()> {
        Ok(())
    }
}

/// Settings of the training step (the objective belongs to the model).
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
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
    /// The reductions.
    pub reduce: Duration,
    /// Clipping, the optimiser, the write-back and the state update.
    pub update: Duration,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The global step this was (0-based).
    pub step: u64,
    /// False when the step was skipped as non-finite.
    pub applied: bool,
    /// Reported terms, means over the global batch (a term nothing was counted for is left
    /// out).
    pub terms: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Where the time went.
    pub timings: Timings,
}

/// A model with its flat parameters, state and optimiser.
pub struct Trainer {
    model: Box<dyn Model>,
    stats: Statistics,
    layout: FlatLayout,
    buffers: FlatLayout,
    params: Vec<f32>,
    /// Gradients, then `(sum, count)` per term, then update statistics.
    buf: Vec<f32>,
    /// Batch statistics of the step.
    batch_stats: Vec<f32>,
    optimizer: Optimizer,
    config: StepConfig,
    noise: Noise,
    step: u64,
    nonfinite_in_row: u32,
    nonfinite_total: u64,
}

impl Trainer {
    /// Wraps a freshly built model.
    pub fn new(model: Box<dyn Model>, config: StepConfig) -> Result<Self> {
        let lr_ok = config.lr.is_finite() && config.lr > 0.0;
        let clip_ok = config.clip_norm.is_finite() && config.clip_norm >= 0.0;
        if !lr_ok || !clip_ok || config.max_nonfinite == 0 {
            return Err(WorkerError::Invalid(format!(
                "learning rate {} must be positive, clip norm {} ≥ 0, max non-finite steps ≥ 1",
                config.lr, config.clip_norm
            )));
        }
        let stats = model.statistics();
        if !stats.terms.windows(2).all(|w| w[0] < w[1]) || !stats.terms.contains(&"loss") {
            return Err(WorkerError::Internal(format!(
                "a model must declare its terms sorted, once each, `loss` among them, not {:?}",
                stats.terms
            )));
        }
        model.params().enable_grad_sink();
        let layout = FlatLayout::new(model.params().vars());
        let buffers = match model.buffers() {
            Some(b) => FlatLayout::new(b.vars()),
            None => FlatLayout::default(),
        };
        if let Some(clash) = buffers
            .slots()
            .iter()
            .find(|b| model.params().vars().contains_key(&b.name))
        {
            return Err(WorkerError::Internal(format!(
                "{} is both a parameter and a buffer",
                clash.name
            )));
        }
        let mut params = vec![0.0; layout.len()];
        layout.read_params(&mut params)?;
        let optimizer = Optimizer::new(config.optimizer, layout.len())?;
        Ok(Trainer {
            buf: vec![0.0; layout.len() + 2 * stats.terms.len() + stats.update],
            batch_stats: vec![0.0; stats.batch],
            stats,
            model,
            layout,
            buffers,
            params,
            optimizer,
            noise: Noise::new(config.seed),
            config,
            step: 0,
            nonfinite_in_row: 0,
            nonfinite_total: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The model, with the parameters and state of the trainer's last step.
    pub fn into_model(self) -> Box<dyn Model> {
        self.model
    }

    /// The parameter layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The flat parameters (the optimiser's master copy).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The model's non-gradient state, flat in name order.
    pub fn buffer_values(&self) -> Result<Vec<f32>> {
        let mut values = vec![0.0; self.buffers.len()];
        self.buffers.read_params(&mut values)?;
        Ok(values)
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

    /// FNV-1a over the bits of the parameters and then the non-gradient state: equal on every
    /// replica of a healthy run (the replica check).
    pub fn checksum(&self) -> Result<u64> {
        let fold = |h: u64, v: &f32| (h ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3);
        let h = self.params.iter().fold(0xcbf2_9ce4_8422_2325_u64, fold);
        Ok(self.buffer_values()?.iter().fold(h, fold))
    }

    /// The trainer's whole state as checkpoint files, with the data cursor after its last step.
    pub fn checkpoint_files(
        &self,
        cursor: Cursor,
        seed: u64,
        config_sha256: &str,
    ) -> Result<Files> {
        let state = TrainState {
            format: checkpoint::FORMAT,
            step: self.step,
            cursor,
            nonfinite_total: self.nonfinite_total,
            optimizer_step: self.optimizer.state().step,
            seed,
            config_sha256: config_sha256.to_string(),
        };
        let buffer_values = self.buffer_values()?;
        let tensors = ModelTensors {
            params: &self.layout,
            param_values: &self.params,
            buffers: &self.buffers,
            buffer_values: &buffer_values,
        };
        checkpoint::encode(&tensors, self.optimizer.state(), &state)
    }

    /// Decodes checkpoint files (read from `origin`, named in errors) for this trainer's model.
    pub fn decode(&self, files: &Files, origin: &std::path::Path) -> Result<Checkpoint> {
        checkpoint::decode(files, &self.layout, &self.buffers, origin)
    }

    /// Takes on a checkpoint: parameters, non-gradient state, optimiser state and counters.
    /// Returns the data cursor to continue from.
    pub fn restore(&mut self, ck: Checkpoint) -> Result<Cursor> {
        let invalid = |what: &str, got: usize, want: usize| {
            WorkerError::Invalid(format!("{got} {what} restored, the model has {want}"))
        };
        if ck.params.len() != self.layout.len() {
            return Err(invalid("parameters", ck.params.len(), self.layout.len()));
        }
        if ck.buffers.len() != self.buffers.len() {
            return Err(invalid(
                "state values",
                ck.buffers.len(),
                self.buffers.len(),
            ));
        }
        self.optimizer.restore(ck.optimizer)?;
        self.layout.write_params(&ck.params)?;
        self.buffers.write_params(&ck.buffers)?;
        self.params = ck.params;
        self.step = ck.state.step;
        self.nonfinite_total = ck.state.nonfinite_total;
        self.nonfinite_in_row = 0;
        Ok(ck.state.cursor)
    }

    /// One training step on this worker's part of a global batch.
    pub fn train_step(
        &mut self,
        batch: &Batch,
        reduce: &mut dyn Reduce,
        device: &Device,
    ) -> Result<StepReport> {
        let start = Instant::now();
        let n = self.layout.len();
        let x = Tensor::from_slice(&batch.x, (batch.rows(), batch.dim), device)?;
        let input = Input {
            x: &x,
            labels: &batch.labels,
            ids: &batch.ids,
        };
        // Time in the batch statistics' all-reduce (counted as reduction, not compute).
        let mut stats_reduce = Duration::ZERO;
        if !self.batch_stats.is_empty() {
            if batch.rows() > 0 {
                let ctx = self.context(batch.global_rows, &[]);
                let local = self
                    .model
                    .batch_statistics(&input, &ctx)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                self.check_len("batch statistics", local.len(), self.stats.batch)?;
                self.batch_stats.copy_from_slice(&local);
            } else {
                self.batch_stats.fill(0.0);
            }
            let t = Instant::now();
            reduce.all_reduce_sum(&mut self.batch_stats)?;
            stats_reduce = t.elapsed();
        }
        if batch.rows() > 0 {
            self.compute(&input, batch.global_rows)?;
        } else {
            // A rank with no rows in this (short, final) batch contributes nothing to the sums.
            self.buf.fill(0.0);
        }
        let computed = Instant::now();
        reduce.all_reduce_sum(&mut self.buf)?;
        let reduced = Instant::now();
        let t = self.stats.terms.len();
        let terms: BTreeMap<String, f64> = self
            .stats
            .terms
            .iter()
            .zip(self.buf[n..n + 2 * t].chunks_exact(2))
            .filter(|(_, sc)| sc[1] > 0.0)
            .map(|(k, sc)| (k.to_string(), f64::from(sc[0]) / f64::from(sc[1])))
            .collect();
        let step = self.step;
        self.step += 1;
        let lr = self.config.schedule.lr(self.config.lr, step);
        let grad_norm = global_norm(&self.buf[..n]);
        let (compute, reducing) = (
            computed - start - stats_reduce,
            reduced - computed + stats_reduce,
        );
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
            return Ok(StepReport {
                step,
                applied: false,
                terms,
                grad_norm: f64::NAN,
                lr,
                timings: Timings {
                    compute,
                    reduce: reducing,
                    update: Duration::ZERO,
                },
            });
        }
        self.nonfinite_in_row = 0;
        clip_grad_norm(&mut self.buf[..n], grad_norm, self.config.clip_norm);
        self.optimizer.step(&mut self.params, &self.buf[..n], lr);
        self.layout.write_params(&self.params)?;
        if self.stats.update > 0 {
            self.model.update_state(&self.buf[n + 2 * t..], step)?;
        }
        Ok(StepReport {
            step,
            applied: true,
            terms,
            grad_norm,
            lr,
            timings: Timings {
                compute,
                reduce: reducing,
                update: reduced.elapsed(),
            },
        })
    }

    fn context<'a>(&'a self, global_rows: u64, batch_stats: &'a [f32]) -> StepContext<'a> {
        StepContext {
            step: self.step,
            noise: &self.noise,
            global_rows,
            batch_stats,
        }
    }

    fn check_len(&self, what: &str, got: usize, declared: usize) -> Result<()> {
        if got == declared {
            Ok(())
        } else {
            Err(WorkerError::Internal(format!(
                "the model computed {got} {what} but declared {declared}"
            )))
        }
    }

    /// Forward and backward on this rank's rows: gradients, term sums and counts, and update
    /// statistics into the buffer.
    fn compute(&mut self, input: &Input<'_>, global_rows: u64) -> Result<()> {
        self.model.params().grad_sink().begin_step();
        let ctx = self.context(global_rows, &self.batch_stats);
        let out = self.model.loss(input, &ctx)?;
        let grads = out.loss.backward()?;
        let n = self.layout.len();
        let (head, tail) = self.buf.split_at_mut(n);
        let sink = self.model.params().grad_sink();
        self.layout.read_grads(sink, &grads, head)?;
        let t = self.stats.terms.len();
        let (term_slots, update_slots) = tail.split_at_mut(2 * t);
        if out.terms.len() != t {
            return Err(WorkerError::Internal(format!(
                "the model reported terms {:?} but declared {:?}",
                out.terms.keys().collect::<Vec<_>>(),
                self.stats.terms
            )));
        }
        for (slot, name) in term_slots.chunks_exact_mut(2).zip(&self.stats.terms) {
            let term = out.terms.get(name).ok_or_else(|| {
                WorkerError::Internal(format!("the model did not report term {name}"))
            })?;
            slot[0] = term
                .sum
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?;
            slot[1] = term.count as f32;
        }
        match out.update_stats {
            Some(u) => {
                let values = u.detach().flatten_all()?.to_vec1::<f32>()?;
                if values.len() != update_slots.len() {
                    return Err(WorkerError::Internal(format!(
                        "the model computed {} update statistics but declared {}",
                        values.len(),
                        update_slots.len()
                    )));
                }
                update_slots.copy_from_slice(&values);
            }
            None if update_slots.is_empty() => {}
            None => {
                return Err(WorkerError::Internal(format!(
                    "the model declared {} update statistics but computed none",
                    update_slots.len()
                )))
            }
        }
        Ok(())
    }

    /// Names what is non-finite: loss terms first, then the first parameter with a bad gradient
    /// (searched only when the gradient norm says there is one), then the update statistics.
    fn non_finite(&self, terms: &BTreeMap<String, f64>, grad_norm: f64) -> Option<String> {
        let bad: Vec<&str> = terms
            .iter()
            .filter(|(_, v)| !v.is_finite())
            .map(|(k, _)| k.as_str())
            .collect();
        if !bad.is_empty() {
            return Some(format!("loss terms {}", bad.join(", ")));
        }
        let update = &self.buf[self.layout.len() + 2 * self.stats.terms.len()..];
        if grad_norm.is_finite() {
            return (!update.iter().all(|v| v.is_finite()))
                .then(|| "the model's state statistics".to_string());
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
