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
//!
//! A model on a GPU keeps the step there: the gradients are packed into one flat device
//! tensor, the optimiser's master parameters and moments are flat device tensors, the update
//! runs as device kernels and is copied into the variables on the device. The packed buffer
//! crosses to the host once and back once per step when the all-reduce spans processes, not at
//! all in one process; the host reads only the reported terms, the update statistics and the
//! gradient norm (one small copy).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use elbo_datasets::{Batch, Cursor};
use elbo_models::{round_statistics, Input, Model, Noise, Statistics, StepContext};

use crate::checkpoint::{self, Checkpoint, Files, ModelTensors, TrainState};
use crate::error::{Result, WorkerError};
use crate::flat::FlatLayout;
use crate::optim::{clip_grad_norm, clip_scale, global_norm, Optimizer, OptimizerConfig, Schedule};

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

/// Where the optimiser's master copy of the parameters lives.
enum Master {
    /// A host buffer, updated in place (a model on the CPU).
    Host(Vec<f32>),
    /// One flat tensor on the model's device (a model on a GPU).
    Device(Tensor),
}

/// A model with its flat parameters, state and optimiser.
pub struct Trainer {
    model: Box<dyn Model>,
    stats: Statistics,
    layout: FlatLayout,
    buffers: FlatLayout,
    /// The device the model's parameters live on.
    device: Device,
    master: Master,
    /// Gradients, then `(sum, count)` per term, then update statistics. With the master on a
    /// device, the gradients here are current only when the all-reduce went through the host.
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
        let device = layout
            .slots()
            .first()
            .map_or(Device::Cpu, |s| s.var.device().clone());
        let trainer = Trainer {
            buf: vec![0.0; layout.len() + 2 * stats.terms.len() + stats.update],
            batch_stats: Vec::with_capacity(stats.batch.iter().sum()),
            stats,
            model,
            layout,
            buffers,
            master: Master::Host(params),
            device,
            optimizer,
            noise: Noise::new(config.seed),
            config,
            step: 0,
            nonfinite_in_row: 0,
            nonfinite_total: 0,
        };
        if trainer.device.is_cpu() {
            Ok(trainer)
        } else {
            trainer.keep_on_device()
        }
    }

    /// Keeps the master parameters, the packed gradients and the optimiser's moments as flat
    /// tensors on the model's device and runs the update there. What a model on a GPU gets
    /// from [`Trainer::new`]; on the CPU (where the host loop is faster) it checks that path.
    pub fn keep_on_device(mut self) -> Result<Self> {
        let params = self.layout.read_tensor(&self.device)?;
        self.optimizer.place_on(&self.device)?;
        self.master = Master::Device(params);
        Ok(self)
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

    /// The flat parameters (the optimiser's master copy; copied from the device when it lives
    /// there).
    pub fn params(&self) -> Result<Vec<f32>> {
        match &self.master {
            Master::Host(p) => Ok(p.clone()),
            Master::Device(t) => Ok(t.to_vec1::<f32>()?),
        }
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
        let h = self.params()?.iter().fold(0xcbf2_9ce4_8422_2325_u64, fold);
        Ok(self.buffer_values()?.iter().fold(h, fold))
    }

    /// The trainer's whole state as checkpoint files, with the data cursor after its last step.
    pub fn checkpoint_files(
        &self,
        cursor: Cursor,
        seed: u64,
        config_sha256: &str,
    ) -> Result<Files> {
        let optimizer = self.optimizer.state()?;
        let state = TrainState {
            format: checkpoint::FORMAT,
            step: self.step,
            cursor,
            nonfinite_total: self.nonfinite_total,
            optimizer_step: optimizer.step,
            seed,
            config_sha256: config_sha256.to_string(),
        };
        let buffer_values = self.buffer_values()?;
        let param_values = self.params()?;
        let tensors = ModelTensors {
            params: &self.layout,
            param_values: &param_values,
            buffers: &self.buffers,
            buffer_values: &buffer_values,
        };
        checkpoint::encode(&tensors, &optimizer, &state)
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
        self.master = match self.master {
            Master::Host(_) => Master::Host(ck.params),
            Master::Device(_) => Master::Device(self.layout.read_tensor(&self.device)?),
        };
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
        // Each round knows the global sums of the rounds before it.
        self.batch_stats.clear();
        for (round, len) in self.model.batch_rounds()?.into_iter().enumerate() {
            let mut sums = if batch.rows() > 0 {
                let ctx = self.context(batch.global_rows, &self.batch_stats);
                round_statistics(self.model.as_ref(), &input, &ctx, round, len)?
            } else {
                vec![0.0; len]
            };
            let t = Instant::now();
            reduce.all_reduce_sum(&mut sums)?;
            stats_reduce += t.elapsed();
            self.batch_stats.extend_from_slice(&sums);
        }
        let packed = if batch.rows() > 0 {
            self.compute(&input, batch.global_rows)?
        } else {
            // A rank with no rows in this (short, final) batch contributes nothing to the sums.
            self.buf.fill(0.0);
            None
        };
        let computed = Instant::now();
        let (grad_norm, device_grads) = self.reduce(packed, reduce)?;
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
        let (compute, reducing) = (
            computed - start - stats_reduce,
            reduced - computed + stats_reduce,
        );
        if let (false, Some(g)) = (grad_norm.is_finite(), &device_grads) {
            // Naming the parameter with a bad gradient needs the gradients on the host.
            self.buf[..n].copy_from_slice(&g.to_vec1::<f32>()?);
        }
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
        let clip_norm = self.config.clip_norm;
        match (&mut self.master, device_grads) {
            (Master::Host(params), _) => {
                clip_grad_norm(&mut self.buf[..n], grad_norm, clip_norm);
                self.optimizer.step(params, &self.buf[..n], lr);
                self.layout.write_params(params)?;
            }
            (Master::Device(params), Some(grads)) => {
                let grads = match clip_scale(grad_norm, clip_norm) {
                    Some(scale) => grads.affine(f64::from(scale), 0.0)?,
                    None => grads,
                };
                *params = self.optimizer.step_tensors(params, &grads, lr)?;
                self.layout.write_tensor(params)?;
            }
            (Master::Device(_), None) => {
                return Err(WorkerError::Internal(
                    "the device step lost its gradients".into(),
                ))
            }
        }
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

    /// Sums the packed buffer over the ranks; returns the global gradient norm and, when the
    /// master lives on a device, the summed gradients there. `packed` is the device's packed
    /// buffer (None: the host buffer holds it, or this rank had no rows).
    fn reduce(
        &mut self,
        packed: Option<Tensor>,
        reduce: &mut dyn Reduce,
    ) -> Result<(f64, Option<Tensor>)> {
        let n = self.layout.len();
        if let Master::Host(_) = self.master {
            reduce.all_reduce_sum(&mut self.buf)?;
            return Ok((global_norm(&self.buf[..n]), None));
        }
        let local = match packed {
            Some(p) => p,
            None => Tensor::zeros(self.buf.len(), candle_core::DType::F32, &self.device)?,
        };
        if reduce.world() > 1 {
            // One copy to the host for the all-reduce, one back.
            self.buf = local.to_vec1::<f32>()?;
            reduce.all_reduce_sum(&mut self.buf)?;
            let grads = Tensor::from_slice(&self.buf[..n], n, &self.device)?;
            return Ok((global_norm(&self.buf[..n]), Some(grads)));
        }
        // One process: only the terms, the update statistics and the norm leave the device.
        let grads = local.narrow(0, 0, n)?;
        let rest = self.buf.len() - n;
        let norm_sq = grads.sqr()?.sum_all()?.reshape(1)?;
        let tail = Tensor::cat(&[&local.narrow(0, n, rest)?, &norm_sq], 0)?.to_vec1::<f32>()?;
        self.buf[n..].copy_from_slice(&tail[..rest]);
        Ok((f64::from(tail[rest]).sqrt(), Some(grads)))
    }

    fn context<'a>(&'a self, global_rows: u64, batch_stats: &'a [f32]) -> StepContext<'a> {
        StepContext {
            step: self.step,
            noise: &self.noise,
            global_rows,
            batch_stats,
        }
    }

    /// Forward and backward on this rank's rows: gradients, term sums and counts, and update
    /// statistics packed into the host buffer, or (master on a device) into one flat tensor
    /// there, returned.
    fn compute(&mut self, input: &Input<'_>, global_rows: u64) -> Result<Option<Tensor>> {
        self.model.params().grad_sink().begin_step();
        let ctx = self.context(global_rows, &self.batch_stats);
        let out = self.model.loss(input, &ctx)?;
        let grads = out.loss.backward()?;
        let t = self.stats.terms.len();
        if out.terms.len() != t {
            return Err(WorkerError::Internal(format!(
                "the model reported terms {:?} but declared {:?}",
                out.terms.keys().collect::<Vec<_>>(),
                self.stats.terms
            )));
        }
        let mut sums = Vec::with_capacity(t);
        let mut counts = Vec::with_capacity(t);
        for name in &self.stats.terms {
            let term = out.terms.get(name).ok_or_else(|| {
                WorkerError::Internal(format!("the model did not report term {name}"))
            })?;
            sums.push(term.sum.to_dtype(candle_core::DType::F32)?);
            counts.push(term.count as f32);
        }
        let update = out
            .update_stats
            .map(|u| u.detach().to_dtype(candle_core::DType::F32)?.flatten_all())
            .transpose()?;
        let declared = self.stats.update;
        match &update {
            Some(u) if u.elem_count() != declared => {
                return Err(WorkerError::Internal(format!(
                    "the model computed {} update statistics but declared {declared}",
                    u.elem_count()
                )))
            }
            None if declared > 0 => {
                return Err(WorkerError::Internal(format!(
                    "the model declared {declared} update statistics but computed none"
                )))
            }
            _ => {}
        }
        let sink = self.model.params().grad_sink();
        if let Master::Device(_) = self.master {
            let mut parts = self.layout.grad_parts(sink, &grads, &self.device)?;
            let counts = Tensor::from_vec(counts, t, &self.device)?;
            let sums = Tensor::stack(&sums, 0)?;
            let pairs = Tensor::stack(&[sums, counts], 1)?;
            parts.push(pairs.flatten_all()?);
            parts.extend(update);
            let packed = Tensor::cat(&parts, 0)?;
            // Wait for the device here, so that its work counts as compute, not reduction.
            self.device.synchronize()?;
            return Ok(Some(packed));
        }
        let n = self.layout.len();
        let (head, tail) = self.buf.split_at_mut(n);
        self.layout.read_grads(sink, &grads, head)?;
        let (term_slots, update_slots) = tail.split_at_mut(2 * t);
        for ((slot, sum), count) in term_slots.chunks_exact_mut(2).zip(&sums).zip(counts) {
            slot[0] = sum.to_scalar::<f32>()?;
            slot[1] = count;
        }
        if let Some(u) = update {
            update_slots.copy_from_slice(&u.to_vec1::<f32>()?);
        }
        Ok(None)
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
