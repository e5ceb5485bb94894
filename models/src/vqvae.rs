//! The VQ-VAE (van den Oord et al. 2017): a convolutional encoder, a nearest-code quantiser
//! over a codebook of K codes of dimension D (`model.latent_dim`), a straight-through gradient,
//! and a convolutional decoder — the sonnet/Keras recipe.
//!
//! **Networks.** The encoder reads `x − ½` (data in [−½, ½], the paper's range): 4×4 stride-2
//! convolutions to `channels` (each followed by `model.activation`), a 3×3 convolution, a stack
//! of residual blocks and a ReLU, then a 1×1 convolution to D channels. The decoder mirrors it:
//! a 3×3 convolution from D, the residual stack and a ReLU, 4×4 stride-2 transposed
//! convolutions back to the image. Every side must be divisible by 2^len(channels); 28 px
//! with `channels = [32, 64]` gives a 7×7 grid of codes.
//!
//! **Objective** (sonnet's, every term a per-element mean): each row's reconstruction term
//! `rec` — the mean squared error divided by `model.variance` under `gaussian_fixed` (set it
//! to the training data's variance and `rec` is the NMSE), or the mean Bernoulli NLL per pixel
//! — plus `beta` × the commitment `mean ‖z_e − sg(e)‖²`, plus with `codebook = "loss"` the
//! codebook term `mean ‖sg(z_e) − e‖²`. A batch's loss is the mean over the *global* batch's
//! rows, so the gradients of N ranks add up to the gradient of one process.
//!
//! **Quantiser.** Each position's nearest code by squared distance, computed row by row on
//! the host (ties go to the lowest index; a row's code never depends on the rows beside it);
//! straight-through: the decoder reads `z_e + sg(e − z_e)`, so `∂/∂z_e` is the identity.
//!
//! **EMA codebook** (the default; non-gradient state in [`Buffers`]): each step's one-hot
//! counts `n_i` and sums `s_i` of the encoder outputs assigned to code i are the model's
//! update statistics — summed across ranks in the all-reduce that carries the gradients — and
//! every replica then updates `N_i ← γN_i + (1−γ)n_i`, `m_i ← γm_i + (1−γ)s_i` and
//! `e_i = m_i / Ñ_i` with the Laplace-smoothed `Ñ_i = (N_i + ε)/(ΣN + Kε)·ΣN`. N starts at 1
//! and m at the initial codebook (Jukebox's start: an unused code keeps its place instead of
//! jumping to m/ε).
//!
//! **Dead-code restart.** A code whose `N_i` is below `restart_threshold` before a step is
//! replaced by one encoder output of that step's *global* batch, and its statistics reset
//! (`N_i` = the threshold, `m_i = N_i·e_i`). The choice is a function of the run seed, the
//! step and each output's (row id, position) only: every output holds a seeded draw for each
//! of [`RESTART_SLOTS`] slots of each code, an output is a slot's candidate with probability
//! 1/(outputs in the global batch), and a slot with exactly one candidate names it — counts
//! and sums of the candidates ride in the same all-reduce, so every rank, at any world size,
//! restarts the same codes with the same vectors. A code whose slots all miss (about 16% of
//! steps) waits for the next step.
//!
//! **Sampling** without a learned prior draws each position's code independently from the
//! codes' EMA usage (a unigram prior over codes): a baseline, not a model of the grid.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bernoulli::bernoulli_nll;
use crate::buffers::Buffers;
use crate::error::{ModelError, Result};
use crate::layers::{Activation, ConvLayer, ResidualBlock};
use crate::likelihood::LikelihoodKind;
use crate::model::{
    EvalOptions, Evaluator, Input, LossOutput, Metric, Metrics, Model, Picture, Statistics,
    StepContext, Term,
};
use crate::noise::Purpose;
use crate::params::Params;
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{Architecture, BuildContext, ModelSpec};

/// Candidate slots per code for a restart (see the module docs).
pub const RESTART_SLOTS: usize = 4;

/// The codebook buffer (K, D).
pub const CODEBOOK: &str = "quantiser.codebook";
/// The EMA count of each code's assignments (K): usage in both codebook modes.
pub const EMA_COUNT: &str = "quantiser.ema_count";
/// The EMA sum of the encoder outputs assigned to each code (K, D).
pub const EMA_SUM: &str = "quantiser.ema_sum";

/// How the codebook learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodebookLearning {
    /// Exponential moving averages of the assigned outputs (the paper's appendix; sonnet's
    /// `VectorQuantizerEMA`).
    Ema,
    /// A codebook parameter trained by the codebook loss `‖sg(z_e) − e‖²`.
    Loss,
}

/// `[model.vqvae]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqVaeConfig {
    /// Codes in the codebook (K).
    pub codes: u32,
    /// Output channels of the stride-2 convolutions (each halves the image).
    pub channels: Vec<u32>,
    /// Residual blocks in the encoder and in the decoder.
    pub residual_blocks: u32,
    /// Channels inside a residual block.
    pub residual_hidden: u32,
    /// Weight of the commitment term.
    pub beta: f64,
    /// How the codebook learns.
    pub codebook: CodebookLearning,
    /// EMA decay γ (also of the usage counts in `loss` mode).
    pub decay: f64,
    /// Laplace smoothing ε of the EMA counts.
    pub epsilon: f64,
    /// Codes whose EMA count falls below this are restarted from encoder outputs (0: never;
    /// EMA codebook only).
    pub restart_threshold: f64,
    /// Added to every initial code (moves the codebook away from the data, e.g. to watch a
    /// collapsed codebook recover).
    pub init_offset: f64,
}

impl Default for VqVaeConfig {
    fn default() -> Self {
        VqVaeConfig {
            codes: 128,
            channels: vec![32, 64],
            residual_blocks: 2,
            residual_hidden: 32,
            beta: 0.25,
            codebook: CodebookLearning::Ema,
            decay: 0.99,
            epsilon: 1e-5,
            restart_threshold: 1.0,
            init_offset: 0.0,
        }
    }
}

impl Section for VqVaeConfig {
    fn validate(&self) -> Result<(), SectionError> {
        if !(1..=65_536).contains(&self.codes) {
            return Err(SectionError::new(
                "codes",
                format!("found {}, expected 1 to 65536 codes", self.codes),
            ));
        }
        if self.channels.is_empty() || self.channels.len() > 6 || self.channels.contains(&0) {
            return Err(SectionError::new(
                "channels",
                format!(
                    "found {:?}, expected 1 to 6 positive channel counts (one per stride-2 convolution)",
                    self.channels
                ),
            ));
        }
        if self.residual_blocks > 0 && self.residual_hidden == 0 {
            return Err(SectionError::new(
                "residual_hidden",
                "found 0, expected positive channels inside the residual blocks",
            ));
        }
        let finite_nonneg = |key: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(SectionError::new(
                    key,
                    format!("found {v}, expected a finite number ≥ 0"),
                ))
            }
        };
        finite_nonneg("beta", self.beta)?;
        finite_nonneg("restart_threshold", self.restart_threshold)?;
        if !(0.0..1.0).contains(&self.decay) {
            return Err(SectionError::new(
                "decay",
                format!("found {}, expected 0 ≤ γ < 1", self.decay),
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(SectionError::new(
                "epsilon",
                format!("found {}, expected a finite number > 0", self.epsilon),
            ));
        }
        if !self.init_offset.is_finite() {
            return Err(SectionError::new(
                "init_offset",
                format!("found {}, expected a finite number", self.init_offset),
            ));
        }
        if self.codebook == CodebookLearning::Loss && self.restart_threshold > 0.0 {
            return Err(SectionError::new(
                "restart_threshold",
                format!(
                    "found {} with codebook = \"loss\": restarts replace EMA statistics, so they \
                     need codebook = \"ema\" (or restart_threshold = 0)",
                    self.restart_threshold
                ),
            ));
        }
        Ok(())
    }
}

/// Index of the nearest code of each `dim`-long row of `z` among the rows of `codebook`, by
/// squared Euclidean distance; ties go to the lowest index. Each row is computed alone, so
/// its code does not depend on the rows beside it (or on how a batch was split).
pub fn nearest_codes(z: &[f32], codebook: &[f32], dim: usize) -> Vec<u32> {
    z.par_chunks(dim.max(1) * 64)
        .flat_map_iter(|rows| {
            rows.chunks_exact(dim).map(|row| {
                let mut best = (f32::INFINITY, 0u32);
                for (k, code) in codebook.chunks_exact(dim).enumerate() {
                    let d: f32 = row.iter().zip(code).map(|(a, b)| (a - b) * (a - b)).sum();
                    if d < best.0 {
                        best = (d, k as u32);
                    }
                }
                best.1
            })
        })
        .collect()
}

/// exp(entropy) of the distribution proportional to `counts` (0 when they are all 0).
fn perplexity(counts: &[f64]) -> f64 {
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|c| **c > 0.0)
        .map(|c| {
            let p = c / total;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// One EMA step of the codebook from a step's global one-hot `counts` (K) and `sums` (K·D):
/// updates `count` and `sum` in place and returns the codebook `m_i / Ñ_i` with
/// Laplace-smoothed counts (see the module docs). Computed in f64.
pub fn ema_step(
    count: &mut [f32],
    sum: &mut [f32],
    counts: &[f32],
    sums: &[f32],
    decay: f64,
    epsilon: f64,
) -> Vec<f32> {
    let k = count.len();
    let dim = sum.len() / k.max(1);
    for (n, c) in count.iter_mut().zip(counts) {
        *n = (decay * f64::from(*n) + (1.0 - decay) * f64::from(*c)) as f32;
    }
    for (m, s) in sum.iter_mut().zip(sums) {
        *m = (decay * f64::from(*m) + (1.0 - decay) * f64::from(*s)) as f32;
    }
    let total: f64 = count.iter().map(|n| f64::from(*n)).sum();
    let mut codebook = vec![0f32; k * dim];
    for i in 0..k {
        let smoothed = (f64::from(count[i]) + epsilon) / (total + k as f64 * epsilon) * total;
        for j in 0..dim {
            codebook[i * dim + j] = (f64::from(sum[i * dim + j]) / smoothed) as f32;
        }
    }
    codebook
}

/// The layout of the update statistics: counts (K), then with the EMA codebook the sums
/// (K·D), then with restarts each slot's candidate count (K·S) and sum (K·S·D).
#[derive(Debug, Clone, Copy)]
struct UpdateLayout {
    codes: usize,
    dim: usize,
    sums: bool,
    restart: bool,
}

impl UpdateLayout {
    fn len(&self) -> usize {
        let (k, d, s) = (self.codes, self.dim, RESTART_SLOTS);
        k + usize::from(self.sums) * k * d + usize::from(self.restart) * (k * s + k * s * d)
    }

    /// Offsets of the sums, the candidate counts and the candidate sums.
    fn offsets(&self) -> (usize, usize, usize) {
        let (k, d, s) = (self.codes, self.dim, RESTART_SLOTS);
        let sums = k;
        let cand = sums + usize::from(self.sums) * k * d;
        (sums, cand, cand + k * s)
    }
}

/// A quantised batch.
struct Quantised {
    /// The code of each position, row-major over (row, y, x).
    indices: Vec<u32>,
    /// The encoder outputs, (positions, D) flattened.
    z: Vec<f32>,
    /// The decoder's input (B, D, h, w), straight-through.
    zq: Tensor,
    /// Each row's commitment `mean ‖z_e − sg(e)‖²` (B,).
    commitment: Tensor,
    /// Each row's codebook term `mean ‖sg(z_e) − e‖²` (B,), with the codebook loss.
    codebook: Option<Tensor>,
}

/// The VQ-VAE.
pub struct VqVae {
    params: Params,
    buffers: Buffers,
    config: VqVaeConfig,
    likelihood: LikelihoodKind,
    variance: f64,
    activation: Activation,
    /// Example shape (C, H, W).
    shape: (usize, usize, usize),
    /// Code grid (h, w).
    grid: (usize, usize),
    codes: usize,
    dim: usize,
    encoder: Vec<ConvLayer>,
    encoder_out: ConvLayer,
    encoder_res: Vec<ResidualBlock>,
    pre_vq: ConvLayer,
    decoder_in: ConvLayer,
    decoder_res: Vec<ResidualBlock>,
    decoder: Vec<ConvLayer>,
    /// The codebook (K, D): a buffer (EMA) or a parameter (codebook loss).
    codebook: Tensor,
}

impl VqVae {
    /// Builds a VQ-VAE with parameters drawn from `seed`.
    pub fn new(spec: &ModelSpec, config: VqVaeConfig, device: &Device, seed: u64) -> Result<Self> {
        config
            .validate()
            .map_err(|e| ModelError::Spec(format!("[model.vqvae] {e}")))?;
        if spec.architecture != Architecture::Conv {
            return Err(ModelError::Spec(
                "a VQ-VAE is convolutional: set model.architecture = \"conv\"".into(),
            ));
        }
        if !matches!(
            spec.likelihood,
            LikelihoodKind::Bernoulli | LikelihoodKind::GaussianFixed
        ) {
            return Err(ModelError::Spec(format!(
                "a VQ-VAE reconstructs under model.likelihood = \"bernoulli\" or \"gaussian_fixed\" \
                 (MSE / model.variance), not {:?}",
                spec.likelihood
            )));
        }
        if !(spec.variance.is_finite() && spec.variance > 0.0) {
            return Err(ModelError::Spec(format!(
                "model.variance {} must be finite and positive",
                spec.variance
            )));
        }
        let (c, h, w) = match spec.input_shape[..] {
            [c, h, w] => (c, h, w),
            [h, w] => (1, h, w),
            _ => {
                return Err(ModelError::Spec(format!(
                    "a VQ-VAE needs images (C, H, W), not examples of shape {:?}",
                    spec.input_shape
                )))
            }
        };
        let factor = 1usize << config.channels.len();
        if c == 0 || h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(ModelError::Spec(format!(
                "images of {c}×{h}×{w}: [model.vqvae] channels {:?} halve them {} times, so \
                 their sides must be positive multiples of {factor}",
                config.channels,
                config.channels.len()
            )));
        }
        let dim = spec.latent_dim;
        if dim == 0 {
            return Err(ModelError::Spec(
                "model.latent_dim (the code dimension D) must be positive".into(),
            ));
        }
        let codes = config.codes as usize;
        let mut p = Params::new(device, seed);
        let channels: Vec<usize> = config.channels.iter().map(|c| *c as usize).collect();
        let top = *channels.last().expect("validated non-empty");
        let mut encoder = Vec::new();
        let mut cin = c;
        for (i, &cout) in channels.iter().enumerate() {
            encoder.push(ConvLayer::halving(
                &mut p,
                &format!("encoder.conv{i}"),
                cin,
                cout,
                false,
            )?);
            cin = cout;
        }
        let encoder_out = ConvLayer::same(&mut p, "encoder.out", (top, top), 3)?;
        let blocks = config.residual_blocks as usize;
        let hidden = config.residual_hidden as usize;
        let encoder_res = (0..blocks)
            .map(|i| ResidualBlock::new(&mut p, &format!("encoder.res{i}"), top, hidden))
            .collect::<Result<Vec<_>>>()?;
        let pre_vq = ConvLayer::same(&mut p, "encoder.pre_vq", (top, dim), 1)?;
        let decoder_in = ConvLayer::same(&mut p, "decoder.in", (dim, top), 3)?;
        let decoder_res = (0..blocks)
            .map(|i| ResidualBlock::new(&mut p, &format!("decoder.res{i}"), top, hidden))
            .collect::<Result<Vec<_>>>()?;
        let mut chans: Vec<usize> = channels.iter().rev().copied().collect();
        chans.push(c);
        let decoder = chans
            .windows(2)
            .enumerate()
            .map(|(i, pair)| {
                let name = format!("decoder.deconv{i}");
                ConvLayer::halving(&mut p, &name, pair[0], pair[1], true)
            })
            .collect::<Result<Vec<_>>>()?;
        // Codes uniform ±√(3/D) (sonnet's variance-scaling init), drawn after the networks.
        let bound = (3.0 / dim as f64).sqrt() as f32;
        let offset = config.init_offset as f32;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0de_b00c);
        let init: Vec<f32> = (0..codes * dim)
            .map(|_| rng.random_range(-bound..=bound) + offset)
            .collect();
        let mut buffers = Buffers::new(device);
        let codebook = match config.codebook {
            CodebookLearning::Ema => {
                buffers.declare(EMA_SUM, &[codes, dim], init.clone())?;
                buffers.declare(CODEBOOK, &[codes, dim], init)?
            }
            CodebookLearning::Loss => p.with_values(CODEBOOK, &[codes, dim], init)?,
        };
        buffers.declare(EMA_COUNT, &[codes], vec![1.0; codes])?;
        Ok(VqVae {
            params: p,
            buffers,
            likelihood: spec.likelihood,
            variance: spec.variance,
            activation: spec.activation,
            shape: (c, h, w),
            grid: (h / factor, w / factor),
            codes,
            dim,
            encoder,
            encoder_out,
            encoder_res,
            pre_vq,
            decoder_in,
            decoder_res,
            decoder,
            codebook,
            config,
        })
    }

    fn layout(&self) -> UpdateLayout {
        let ema = self.config.codebook == CodebookLearning::Ema;
        UpdateLayout {
            codes: self.codes,
            dim: self.dim,
            sums: ema,
            restart: ema && self.config.restart_threshold > 0.0,
        }
    }

    /// The encoder outputs z_e: (B, D, h, w).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = self.shape;
        let b = match x.dims() {
            [b, d] if *d == c * h * w => *b,
            dims => {
                return Err(ModelError::Input(format!(
                    "examples of shape {dims:?}, expected (batch, {})",
                    c * h * w
                )))
            }
        };
        let mut t = x.reshape((b, c, h, w))?.affine(1.0, -0.5)?;
        for conv in &self.encoder {
            t = conv.forward(&t, Some(self.activation))?;
        }
        t = self.encoder_out.forward(&t, None)?;
        for block in &self.encoder_res {
            t = block.forward(&t)?;
        }
        self.pre_vq.forward(&t.relu()?, None)
    }

    /// The decoder's output for a grid of code vectors (B, D, h, w): (B, C·H·W) logits
    /// (Bernoulli) or means in [−½, ½] coordinates (Gaussian).
    fn decode(&self, zq: &Tensor) -> Result<Tensor> {
        let mut t = self.decoder_in.forward(zq, None)?;
        for block in &self.decoder_res {
            t = block.forward(&t)?;
        }
        t = t.relu()?;
        let last = self.decoder.len() - 1;
        for (i, deconv) in self.decoder.iter().enumerate() {
            t = deconv.forward(&t, (i < last).then_some(self.activation))?;
        }
        Ok(t.flatten_from(1)?)
    }

    /// The mean of the observation model in data space for a decoder output.
    fn mean(&self, out: &Tensor) -> Result<Tensor> {
        Ok(match self.likelihood {
            LikelihoodKind::Bernoulli => candle_nn::ops::sigmoid(out)?,
            _ => out.affine(1.0, 0.5)?,
        })
    }

    /// Each row's reconstruction term and squared error (both per-element means): (B,), (B,).
    fn reconstruction(&self, out: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dx = x.dim(1)? as f64;
        let mse = (self.mean(out)? - x)?.sqr()?.mean(D::Minus1)?;
        let rec = match self.likelihood {
            LikelihoodKind::Bernoulli => (bernoulli_nll(out, x)? / dx)?,
            _ => (&mse / self.variance)?,
        };
        Ok((rec, mse))
    }

    /// Nearest codes of `z_e` and the straight-through decoder input.
    fn quantise(&self, z_e: &Tensor) -> Result<Quantised> {
        let (b, d, gh, gw) = z_e.dims4()?;
        let rows = z_e
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((b * gh * gw, d))?;
        let z = rows.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let codebook = self
            .codebook
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let indices = nearest_codes(&z, &codebook, d);
        let idx = Tensor::from_slice(&indices, indices.len(), z_e.device())?;
        let e = self
            .codebook
            .index_select(&idx, 0)?
            .to_dtype(rows.dtype())?;
        let e_sg = e.detach();
        let straight = (&rows + (&e_sg - rows.detach())?)?;
        let per_row = gh * gw * d;
        let commitment = (&rows - &e_sg)?.sqr()?.reshape((b, per_row))?.mean(1)?;
        let codebook = match self.config.codebook {
            CodebookLearning::Loss => Some(
                (rows.detach() - &e)?
                    .sqr()?
                    .reshape((b, per_row))?
                    .mean(1)?,
            ),
            CodebookLearning::Ema => None,
        };
        let zq = straight
            .reshape((b, gh, gw, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(Quantised {
            indices,
            z,
            zq,
            commitment,
            codebook,
        })
    }

    /// The codes' EMA counts.
    fn usage(&self) -> Result<Vec<f32>> {
        self.buffers.values(EMA_COUNT)
    }

    /// This rank's update statistics (see [`UpdateLayout`]).
    fn update_statistics(
        &self,
        q: &Quantised,
        ids: &[u64],
        ctx: &StepContext<'_>,
    ) -> Result<Vec<f32>> {
        let layout = self.layout();
        let (k, d) = (self.codes, self.dim);
        let (sums_at, cand_at, cand_sums_at) = layout.offsets();
        let mut stats = vec![0f32; layout.len()];
        for (v, &i) in q.indices.iter().enumerate() {
            let i = i as usize;
            stats[i] += 1.0;
            if layout.sums {
                let row = &q.z[v * d..][..d];
                for (s, z) in stats[sums_at + i * d..][..d].iter_mut().zip(row) {
                    *s += z;
                }
            }
        }
        if !layout.restart {
            return Ok(stats);
        }
        let threshold = self.config.restart_threshold as f32;
        let dead: Vec<bool> = self.usage()?.iter().map(|n| *n < threshold).collect();
        if !dead.contains(&true) {
            return Ok(stats);
        }
        let positions = self.grid.0 * self.grid.1;
        // Each (slot, output) pair is a candidate with probability 1/outputs: the candidate
        // slots of an output are found by geometric skips over the K·S slots.
        let outputs = ctx.global_rows as f64 * positions as f64;
        let log_miss = (-1.0 / outputs).ln_1p();
        let slots = (k * RESTART_SLOTS) as u64;
        for (row, &id) in ids.iter().enumerate() {
            for p in 0..positions {
                let v = row * positions + p;
                let mut slot = 0u64;
                for draw in 0u64.. {
                    let u =
                        ctx.noise
                            .uniform(Purpose::Choice, ctx.step, id, ((p as u64) << 32) | draw);
                    slot += ((1.0 - u).ln() / log_miss).floor() as u64;
                    if slot >= slots {
                        break;
                    }
                    let code = slot as usize / RESTART_SLOTS;
                    if dead[code] {
                        let s = slot as usize;
                        stats[cand_at + s] += 1.0;
                        let row = &q.z[v * d..][..d];
                        for (t, z) in stats[cand_sums_at + s * d..][..d].iter_mut().zip(row) {
                            *t += z;
                        }
                    }
                    slot += 1;
                }
            }
        }
        Ok(stats)
    }

    /// Code grids (n, h·w) decoded to means in data space: (n, C·H·W).
    fn decode_codes(&self, codes: &[u32], n: usize, device: &Device) -> Result<Tensor> {
        let (gh, gw) = self.grid;
        let idx = Tensor::from_slice(codes, codes.len(), device)?;
        let zq = self
            .codebook
            .index_select(&idx, 0)?
            .reshape((n, gh, gw, self.dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        self.mean(&self.decode(&zq)?)
    }
}

impl Model for VqVae {
    fn params(&self) -> &Params {
        &self.params
    }

    fn buffers(&self) -> Option<&Buffers> {
        Some(&self.buffers)
    }

    fn statistics(&self) -> Statistics {
        let mut terms = vec![
            "codes_alive",
            "commitment",
            "loss",
            "mse",
            "perplexity",
            "rec",
        ];
        if self.config.codebook == CodebookLearning::Loss {
            terms.insert(0, "codebook");
        }
        Statistics {
            terms,
            batch: 0,
            update: self.layout().len(),
        }
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let z_e = self.encode(input.x)?;
        let q = self.quantise(&z_e)?;
        let out = self.decode(&q.zq)?;
        let (rec, mse) = self.reconstruction(&out, input.x)?;
        let mut per_row = (&rec + (&q.commitment * self.config.beta)?)?;
        if let Some(cb) = &q.codebook {
            per_row = (per_row + cb)?;
        }
        let loss = (per_row.sum_all()? / ctx.global_rows as f64)?;
        let rows = input.ids.len();
        let device = input.x.device();
        let usage = self.usage()?;
        let threshold = self.config.restart_threshold.max(1.0) as f32;
        let alive = usage.iter().filter(|n| **n >= threshold).count();
        let usage: Vec<f64> = usage.iter().map(|n| f64::from(*n)).collect();
        let mut terms = BTreeMap::from([
            ("codes_alive", Term::constant(alive as f64, rows, device)?),
            ("commitment", Term::per_row(&q.commitment)?),
            ("loss", Term::per_row(&per_row)?),
            ("mse", Term::per_row(&mse)?),
            (
                "perplexity",
                Term::constant(perplexity(&usage), rows, device)?,
            ),
            ("rec", Term::per_row(&rec)?),
        ]);
        if let Some(cb) = &q.codebook {
            terms.insert("codebook", Term::per_row(cb)?);
        }
        let stats = self.update_statistics(&q, input.ids, ctx)?;
        Ok(LossOutput {
            loss,
            terms,
            update_stats: Some(Tensor::from_vec(stats, self.layout().len(), device)?),
        })
    }

    fn update_state(&mut self, stats: &[f32], _step: u64) -> Result<()> {
        let layout = self.layout();
        if stats.len() != layout.len() {
            return Err(ModelError::Input(format!(
                "VQ-VAE update statistics of {} values, expected {}",
                stats.len(),
                layout.len()
            )));
        }
        let (k, d) = (self.codes, self.dim);
        let (sums_at, cand_at, cand_sums_at) = layout.offsets();
        let counts = &stats[..k];
        let mut count = self.usage()?;
        if !layout.sums {
            let g = self.config.decay;
            for (n, c) in count.iter_mut().zip(counts) {
                *n = (g * f64::from(*n) + (1.0 - g) * f64::from(*c)) as f32;
            }
            return self.buffers.set(EMA_COUNT, &count);
        }
        let mut sum = self.buffers.values(EMA_SUM)?;
        let mut codebook = ema_step(
            &mut count,
            &mut sum,
            counts,
            &stats[sums_at..][..k * d],
            self.config.decay,
            self.config.epsilon,
        );
        if layout.restart {
            let reset = self.config.restart_threshold as f32;
            for code in 0..k {
                let slot = (0..RESTART_SLOTS)
                    .map(|s| code * RESTART_SLOTS + s)
                    .find(|s| stats[cand_at + s] == 1.0);
                if let Some(s) = slot {
                    let vector = &stats[cand_sums_at + s * d..][..d];
                    codebook[code * d..][..d].copy_from_slice(vector);
                    count[code] = reset;
                    for (m, v) in sum[code * d..][..d].iter_mut().zip(vector) {
                        *m = reset * v;
                    }
                }
            }
        }
        self.buffers.set(EMA_COUNT, &count)?;
        self.buffers.set(EMA_SUM, &sum)?;
        self.buffers.set(CODEBOOK, &codebook)
    }

    fn evaluator<'a>(&'a self, _options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(VqEvaluator {
            model: self,
            rows: 0,
            rec: 0.0,
            commitment: 0.0,
            codebook: 0.0,
            mse: 0.0,
            counts: vec![0.0; self.codes],
        }))
    }

    fn sample(
        &self,
        n: usize,
        seed: u64,
        _labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        let usage = self.usage()?;
        let total: f64 = usage.iter().map(|u| f64::from(u.max(0.0))).sum();
        let positions = self.grid.0 * self.grid.1;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de);
        let codes: Vec<u32> = (0..n * positions)
            .map(|_| {
                let mut u = rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
                for (k, c) in usage.iter().enumerate() {
                    u -= f64::from(c.max(0.0));
                    if u < 0.0 {
                        return k as u32;
                    }
                }
                (self.codes - 1) as u32
            })
            .collect();
        self.decode_codes(&codes, n, device)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        let q = self.quantise(&self.encode(input.x)?)?;
        self.mean(&self.decode(&q.zq)?)
    }

    /// `codes.png`: what each code draws when it fills the grid (the first 128 codes), and
    /// `code_usage.png`: one tile per code, filled from the bottom in proportion to its EMA
    /// usage (the fullest tile is the most used code).
    fn pictures(&self, input: &Input<'_>) -> Result<Vec<Picture>> {
        let shown = self.codes.min(128);
        let positions = self.grid.0 * self.grid.1;
        let codes: Vec<u32> = (0..shown as u32)
            .flat_map(|k| std::iter::repeat_n(k, positions))
            .collect();
        let drawn = self
            .decode_codes(&codes, shown, input.x.device())?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let usage = self.usage()?;
        let most = usage
            .iter()
            .copied()
            .fold(0f32, f32::max)
            .max(f32::MIN_POSITIVE);
        let (c, h, w) = self.shape;
        let mut bars = Vec::with_capacity(self.codes * c * h * w);
        for u in &usage {
            let filled = ((u / most).clamp(0.0, 1.0) * h as f32).round() as usize;
            for _ in 0..c {
                for y in 0..h {
                    let on = if y >= h - filled { 1.0 } else { 0.0 };
                    bars.extend(std::iter::repeat_n(on, w));
                }
            }
        }
        let cols = 16;
        Ok(vec![
            Picture {
                name: "codes".into(),
                values: drawn,
                cols,
            },
            Picture {
                name: "code_usage".into(),
                values: bars,
                cols,
            },
        ])
    }
}

/// The VQ-VAE's test figures: reconstruction, commitment, code usage over the whole test set.
struct VqEvaluator<'a> {
    model: &'a VqVae,
    rows: u64,
    rec: f64,
    commitment: f64,
    codebook: f64,
    mse: f64,
    counts: Vec<f64>,
}

fn sum(t: &Tensor) -> Result<f64> {
    Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Evaluator for VqEvaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        let m = self.model;
        let q = m.quantise(&m.encode(input.x)?)?;
        let (rec, mse) = m.reconstruction(&m.decode(&q.zq)?, input.x)?;
        self.rec += sum(&rec)?;
        self.mse += sum(&mse)?;
        self.commitment += sum(&q.commitment)?;
        if let Some(cb) = &q.codebook {
            self.codebook += sum(cb)?;
        }
        for i in q.indices {
            self.counts[i as usize] += 1.0;
        }
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let n = self.rows.max(1) as f64;
        let m = self.model;
        let mut loss = self.rec + m.config.beta * self.commitment;
        if m.config.codebook == CodebookLearning::Loss {
            loss += self.codebook;
        }
        let used = self.counts.iter().filter(|c| **c > 0.0).count();
        let mut out = Metrics::from([
            ("loss".to_string(), Metric::Value(loss / n)),
            ("rec".to_string(), Metric::Value(self.rec / n)),
            ("commitment".to_string(), Metric::Value(self.commitment / n)),
            ("mse".to_string(), Metric::Value(self.mse / n)),
            (
                "perplexity".to_string(),
                Metric::Value(perplexity(&self.counts)),
            ),
            ("codes_used".to_string(), Metric::Count(used as u64)),
            ("codes".to_string(), Metric::Count(m.codes as u64)),
        ]);
        if m.likelihood == LikelihoodKind::GaussianFixed {
            out.insert("nmse".to_string(), Metric::Value(self.mse / n / m.variance));
        }
        if m.config.codebook == CodebookLearning::Loss {
            out.insert("codebook".to_string(), Metric::Value(self.codebook / n));
        }
        out
    }
}

impl Variant for VqVae {
    const KIND: &'static str = "vqvae";
    const ABOUT: &'static str = "VQ-VAE: nearest-code quantiser, straight-through gradient, EMA \
                                 codebook reduced across workers, dead-code restart";
    type Config = VqVaeConfig;

    fn build(spec: &ModelSpec, config: &VqVaeConfig, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        Ok(Box::new(VqVae::new(
            spec,
            config.clone(),
            &ctx.device,
            ctx.seed,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Fixed encoder outputs against a fixed codebook: the codes, the commitment, and the
    /// straight-through gradient (the identity).
    #[test]
    fn the_quantiser_on_fixed_inputs() {
        let spec = ModelSpec {
            input_shape: vec![1, 4, 4],
            latent_dim: 2,
            architecture: Architecture::Conv,
            hidden: vec![],
            activation: Activation::Relu,
            likelihood: LikelihoodKind::Bernoulli,
            variance: 1.0,
            log_var_clamp: 10.0,
            objective: Default::default(),
        };
        let config = VqVaeConfig {
            codes: 3,
            channels: vec![2],
            residual_blocks: 0,
            ..VqVaeConfig::default()
        };
        let m = VqVae::new(&spec, config, &Device::Cpu, 0).unwrap();
        m.buffers
            .set(CODEBOOK, &[0.0, 0.0, 1.0, 1.0, -1.0, 2.0])
            .unwrap();
        // One row, a 2×2 grid of 2-vectors, laid out (B, D, h, w).
        let positions = [[0.1, -0.1], [0.9, 1.2], [-2.0, 2.0], [0.5, 0.5]];
        let mut nchw = vec![0f32; 8];
        for (p, v) in positions.iter().enumerate() {
            nchw[p] = v[0];
            nchw[4 + p] = v[1];
        }
        let z = Var::from_vec(nchw, (1, 2, 2, 2), &Device::Cpu).unwrap();
        let q = m.quantise(z.as_tensor()).unwrap();
        // (0.5, 0.5) is as near code 0 as code 1: the lower index wins.
        assert_eq!(q.indices, vec![0, 1, 2, 0]);
        let codes = [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [0.0, 0.0]];
        let want: f32 = positions
            .iter()
            .zip(&codes)
            .map(|(p, c)| (p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2))
            .sum::<f32>()
            / 8.0;
        let got = q.commitment.to_vec1::<f32>().unwrap()[0];
        assert!((got - want).abs() < 1e-6, "commitment {got} vs {want}");
        let zq = q.zq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, c) in codes.iter().enumerate() {
            assert!((zq[p] - c[0]).abs() < 1e-6 && (zq[4 + p] - c[1]).abs() < 1e-6);
        }
        let w = Tensor::from_vec(
            (0..8).map(|i| i as f32 - 3.5).collect::<Vec<f32>>(),
            (1, 2, 2, 2),
            &Device::Cpu,
        )
        .unwrap();
        let grads = (&q.zq * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(z.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(
            g.to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "straight-through: the decoder's gradient passes to z_e unchanged"
        );
    }
}
