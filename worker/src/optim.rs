//! Optimisers over one flat buffer, with public state for checkpoints: Adam, AdamW and SGD
//! with momentum (PyTorch's update rules), gradient clipping by global norm, LR schedules.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use elbo_settings::{LrSchedule, OptimizerKind};

use crate::error::{Result, WorkerError};

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Weight decay (L2 for Adam/SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
}

impl OptimizerConfig {
    /// PyTorch's defaults for `kind` (AdamW's weight decay 0.01 as in PyTorch; 0 otherwise).
    pub fn defaults(kind: OptimizerKind) -> Self {
        OptimizerConfig {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: if kind == OptimizerKind::Adamw {
                0.01
            } else {
                0.0
            },
            momentum: 0.9,
        }
    }
}

/// An optimiser's state: the step count and named per-parameter buffers (flat).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Updates applied so far.
    pub step: u64,
    /// Moment buffers by name (`m`, `v`, or `momentum`), each as long as the parameters.
    pub buffers: BTreeMap<String, Vec<f32>>,
}

/// An optimiser over a flat parameter buffer.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
    /// The moment buffers as flat tensors on a device, when the update runs there
    /// ([`Optimizer::place_on`]); `state.buffers` is then stale until [`Optimizer::state`].
    resident: Option<BTreeMap<String, Tensor>>,
}

impl Optimizer {
    /// A fresh optimiser for `len` parameters.
    pub fn new(config: OptimizerConfig, len: usize) -> Result<Self> {
        let ok = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v < hi;
        if !ok(config.beta1, 0.0, 1.0)
            || !ok(config.beta2, 0.0, 1.0)
            || !ok(config.eps, f64::MIN_POSITIVE, f64::MAX)
            || !ok(config.weight_decay, 0.0, f64::MAX)
            || !ok(config.momentum, 0.0, 1.0)
        {
            return Err(WorkerError::Invalid(format!("invalid optimiser settings {config:?}: betas and momentum in [0, 1), eps > 0, weight decay ≥ 0")));
        }
        let names: &[&str] = match config.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => &["m", "v"],
            OptimizerKind::Sgd => &["momentum"],
        };
        let buffers = names
            .iter()
            .map(|n| (n.to_string(), vec![0.0; len]))
            .collect();
        Ok(Optimizer {
            config,
            state: OptimizerState { step: 0, buffers },
            resident: None,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Keeps the moment buffers on `device` from now on, for [`Optimizer::step_tensors`].
    pub fn place_on(&mut self, device: &Device) -> Result<()> {
        let resident = self
            .state
            .buffers
            .iter()
            .map(|(k, v)| Ok((k.clone(), Tensor::from_slice(v, v.len(), device)?)))
            .collect::<Result<_>>()?;
        self.resident = Some(resident);
        Ok(())
    }

    /// The state, for checkpoints (copied from the device when the moments live there).
    pub fn state(&self) -> Result<OptimizerState> {
        let Some(resident) = &self.resident else {
            return Ok(self.state.clone());
        };
        let buffers = resident
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_vec1::<f32>()?)))
            .collect::<Result<_>>()?;
        Ok(OptimizerState {
            step: self.state.step,
            buffers,
        })
    }

    /// Restores a checkpointed state; it must have this optimiser's buffers and sizes.
    pub fn restore(&mut self, state: OptimizerState) -> Result<()> {
        let same = state.buffers.len() == self.state.buffers.len()
            && self
                .state
                .buffers
                .iter()
                .all(|(k, v)| state.buffers.get(k).is_some_and(|b| b.len() == v.len()));
        if !same {
            let have: Vec<_> = state
                .buffers
                .iter()
                .map(|(k, v)| format!("{k}[{}]", v.len()))
                .collect();
            let want: Vec<_> = self
                .state
                .buffers
                .iter()
                .map(|(k, v)| format!("{k}[{}]", v.len()))
                .collect();
            return Err(WorkerError::Invalid(format!(
                "optimiser state holds {have:?}, expected {want:?}"
            )));
        }
        self.state = state;
        if let Some(resident) = &self.resident {
            let device = resident.values().next().map(|t| t.device().clone());
            if let Some(device) = device {
                self.place_on(&device)?;
            }
        }
        Ok(())
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.state.step += 1;
        let c = self.config;
        let wd = c.weight_decay as f32;
        match c.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let k = adam_coefficients(&c, self.state.step, lr);
                let mut bufs = self.state.buffers.values_mut();
                let m = bufs.next().expect("m");
                let v = bufs.next().expect("v");
                adam(params, grads, m, v, &k);
            }
            OptimizerKind::Sgd => {
                let mu = c.momentum as f32;
                let first = self.state.step == 1;
                let buf = self.state.buffers.get_mut("momentum").expect("momentum");
                for ((p, g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
                    let g = *g + wd * *p;
                    *b = if first { g } else { mu * *b + g };
                    *p -= lr as f32 * *b;
                }
            }
        }
    }
}

/// Adam's constants for (1-based) update `step`.
fn adam_coefficients(c: &OptimizerConfig, step: u64, lr: f64) -> AdamCoefficients {
    let wd = c.weight_decay as f32;
    let t = step as i32;
    let decoupled = c.kind == OptimizerKind::Adamw;
    AdamCoefficients {
        b1: c.beta1 as f32,
        b2: c.beta2 as f32,
        step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
        inv_bc2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
        eps: c.eps as f32,
        l2: if decoupled { 0.0 } else { wd },
        decay: if decoupled {
            1.0 - (lr as f32) * wd
        } else {
            1.0
        },
    }
}

impl Optimizer {
    /// The update of [`Optimizer::step`] on flat tensors on the device where the moments live
    /// ([`Optimizer::place_on`]), composed from candle's element-wise ops — device kernels on a
    /// GPU, no value crossing to the host. Each element sees the same f32 operations in the
    /// same order as the host loop. Returns the new parameters.
    pub fn step_tensors(&mut self, params: &Tensor, grads: &Tensor, lr: f64) -> Result<Tensor> {
        let Some(resident) = self.resident.as_mut() else {
            return Err(WorkerError::Internal(
                "a tensor step on an optimiser whose moments are on the host".into(),
            ));
        };
        self.state.step += 1;
        let c = self.config;
        let wd = c.weight_decay as f32;
        // `affine` multiplies in f32: pass each factor as the f32 the host loop uses.
        let scale = |t: &Tensor, k: f32| t.affine(f64::from(k), 0.0);
        match c.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let k = adam_coefficients(&c, self.state.step, lr);
                let g = if k.l2 != 0.0 {
                    (grads + scale(params, k.l2)?)?
                } else {
                    grads.clone()
                };
                let p = if k.decay != 1.0 {
                    scale(params, k.decay)?
                } else {
                    params.clone()
                };
                let m = resident.get_mut("m").expect("m");
                *m = (scale(m, k.b1)? + scale(&g, 1.0 - k.b1)?)?;
                let v = resident.get_mut("v").expect("v");
                *v = (scale(v, k.b2)? + (scale(&g, 1.0 - k.b2)? * &g)?)?;
                let denom = v
                    .sqrt()?
                    .affine(f64::from(k.inv_bc2_sqrt), f64::from(k.eps))?;
                let m = &resident["m"];
                Ok((p - (scale(m, k.step_size)? / denom)?)?)
            }
            OptimizerKind::Sgd => {
                let g = if wd != 0.0 {
                    (grads + scale(params, wd)?)?
                } else {
                    grads.clone()
                };
                let b = resident.get_mut("momentum").expect("momentum");
                *b = if self.state.step == 1 {
                    g
                } else {
                    (scale(b, c.momentum as f32)? + g)?
                };
                Ok((params - scale(b, lr as f32)?)?)
            }
        }
    }
}

/// Per-step constants of the Adam update (weight decay as an L2 term for Adam, as a decay
/// factor for AdamW; the unused one is neutral, so the loop has no branches).
struct AdamCoefficients {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    l2: f32,
    decay: f32,
}

#[inline(always)]
fn adam_body(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamCoefficients,
) {
    for (((p, g), m), v) in params
        .iter_mut()
        .zip(grads)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        let g = *g + k.l2 * *p;
        *p *= k.decay;
        *m = k.b1 * *m + (1.0 - k.b1) * g;
        *v = k.b2 * *v + (1.0 - k.b2) * g * g;
        *p -= k.step_size * *m / (v.sqrt() * k.inv_bc2_sqrt + k.eps);
    }
}

/// Values below which the Adam update runs on the calling thread (waking the pool costs more).
const PARALLEL_MIN: usize = 1 << 18;

/// The Adam update, compiled for AVX2 when the CPU has it, split across the thread pool in
/// blocks when there are many parameters. Each element's update reads only its own values,
/// Rust never contracts `a·b + c` into an FMA, and add, multiply, divide and square root are
/// correctly rounded at every vector width, so every path and split gives bit-identical
/// results (replicas on different CPUs stay equal).
fn adam(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamCoefficients) {
    let threads = rayon::current_num_threads();
    if threads > 1 && params.len() >= PARALLEL_MIN {
        let block = params.len().div_ceil(threads * 4);
        params
            .par_chunks_mut(block)
            .zip(grads.par_chunks(block))
            .zip(m.par_chunks_mut(block))
            .zip(v.par_chunks_mut(block))
            .for_each(|(((p, g), m), v)| adam_block(p, g, m, v, k));
    } else {
        adam_block(params, grads, m, v, k);
    }
}

/// [`adam_body`] compiled for AVX2 when the CPU has it.
fn adam_block(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamCoefficients,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn adam_avx2(
            params: &mut [f32],
            grads: &[f32],
            m: &mut [f32],
            v: &mut [f32],
            k: &AdamCoefficients,
        ) {
            adam_body(params, grads, m, v, k);
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { adam_avx2(params, grads, m, v, k) };
        }
    }
    adam_body(params, grads, m, v, k);
}

/// The global L2 norm of `values`: non-finite if any value is. Summed in 16 f32 lanes (which
/// vectorise) of 1,024-value blocks, each block's partial sum accumulated in f64.
pub fn global_norm(values: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in values.chunks(1024) {
        let mut lanes = [0.0f32; 16];
        let mut parts = block.chunks_exact(16);
        for part in &mut parts {
            for (l, v) in lanes.iter_mut().zip(part) {
                *l += v * v;
            }
        }
        let tail: f32 = parts.remainder().iter().map(|v| v * v).sum();
        total += f64::from(lanes.iter().sum::<f32>() + tail);
    }
    total.sqrt()
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`), given their `norm`.
pub fn clip_grad_norm(grads: &mut [f32], norm: f64, max_norm: f64) {
    if let Some(scale) = clip_scale(norm, max_norm) {
        grads.iter_mut().for_each(|g| *g *= scale);
    }
}

/// The factor [`clip_grad_norm`] scales gradients of global norm `norm` by, if any.
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f32> {
    (max_norm > 0.0 && norm > max_norm).then(|| (max_norm / (norm + 1e-6)) as f32)
}

/// A learning-rate schedule: its shape, the warm-up and the run's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Constant, linear warm-up, or warm-up then cosine decay to 0 at `total`.
    pub kind: LrSchedule,
    /// Ramp length in steps (0: none).
    pub warmup: u64,
    /// Steps of the whole run (where the cosine reaches 0).
    pub total: u64,
}

impl Schedule {
    /// The base rate throughout.
    pub fn constant() -> Self {
        Schedule {
            kind: LrSchedule::Constant,
            warmup: 0,
            total: 0,
        }
    }

    /// The learning rate at a (0-based) step.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        let ramp = |warmup: u64| {
            if warmup == 0 {
                1.0
            } else {
                ((step + 1) as f64 / warmup as f64).min(1.0)
            }
        };
        let Schedule {
            kind,
            warmup,
            total,
        } = *self;
        match kind {
            LrSchedule::Constant => base,
            LrSchedule::LinearWarmup => base * ramp(warmup),
            LrSchedule::Cosine => {
                if step < warmup {
                    base * ramp(warmup)
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let progress = ((step - warmup) as f64 / span).min(1.0);
                    0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}
