//! The VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019): convolutional
//! encoders, nearest-code quantisers over codebooks of K codes of dimension D
//! (`model.latent_dim`) with a straight-through gradient ([`crate::quantiser`]: EMA codebooks
//! reduced across workers, dead-code restarts), and a convolutional decoder — the
//! sonnet/Keras recipe, and rosinality's two-level layout.
//!
//! **Networks.** The encoder reads `x − ½` (data in [−½, ½], the paper's range): 4×4 stride-2
//! convolutions to `channels` (each followed by `model.activation`), a 3×3 convolution, a stack
//! of residual blocks and a ReLU, then a 1×1 convolution to D. The decoder mirrors it: a 3×3
//! convolution from D, the residual stack and a ReLU, 4×4 stride-2 transposed convolutions back
//! to the image. 28 px with `channels = [32, 64]` gives a 7×7 grid of codes.
//!
//! **Two levels** (`vqvae2`): the bottom encoder's features (stride 2^len(channels)) pass one
//! more stride-2 encoder to the top grid, which is quantised first; the top codes are decoded
//! (3×3, residual blocks, a stride-2 transposed convolution) back to the bottom grid and
//! concatenated with the bottom features before the bottom's 1×1 convolution to D, so the
//! bottom quantiser sees the bottom encoding conditioned on the decoded top. The decoder reads
//! the bottom codes beside the top codes upsampled by a stride-2 transposed convolution. Sides
//! must be divisible by 2^(len(channels)+1): 32 px with `[32, 64]` puts the bottom at stride 4
//! (8×8) and the top at stride 8 (4×4); 28 px takes `channels = [64]`, bottom 14×14 at stride
//! 2 and top 7×7 at stride 4, since 28 has no stride-8 grid.
//!
//! **Objective** (sonnet's, every term a per-element mean): each row's reconstruction term
//! `rec` — the mean squared error divided by `model.variance` under `gaussian_fixed` (set it
//! to the training data's variance and `rec` is the NMSE), or the mean Bernoulli NLL per pixel
//! — plus `beta` × each level's commitment `mean ‖z_e − sg(e)‖²`, plus with
//! `codebook = "loss"` each level's codebook term `mean ‖sg(z_e) − e‖²`. A batch's loss is the
//! mean over the *global* batch's rows, so the gradients of N ranks add up to one process's.
//!
//! **Sampling** without a learned prior draws each position's code independently from the
//! codes' EMA usage (a unigram prior over codes): a baseline, not a model of the grid.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::bernoulli::bernoulli_nll;
use crate::buffers::Buffers;
use crate::error::{ModelError, Result};
use crate::layers::{Activation, ConvLayer, ResidualBlock};
use crate::likelihood::LikelihoodKind;
use crate::model::{
    CodeGrid, CodeModel, EvalOptions, Evaluator, Input, LossOutput, Metric, Metrics, Model,
    Picture, Statistics, StepContext, Term,
};
use crate::params::Params;
use crate::quantiser::{
    perplexity, CodebookInit, CodebookLearning, CodebookSettings, Quantised, Quantiser,
};
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{Architecture, BuildContext, ModelSpec};

/// The codebook buffer (K, D) of a one-level VQ-VAE (a two-level one has
/// `quantiser.bottom.*` and `quantiser.top.*`).
pub const CODEBOOK: &str = "quantiser.codebook";
/// The EMA count of each code's assignments (K): usage in both codebook modes.
pub const EMA_COUNT: &str = "quantiser.ema_count";
/// The EMA sum of the encoder outputs assigned to each code (K, D).
pub const EMA_SUM: &str = "quantiser.ema_sum";

/// `[model.vqvae]` and `[model.vqvae2]` (K codes per level).
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
    /// How the codebook starts: `uniform` (±√(3/D) plus `init_offset`) or `kmeans` (on the
    /// encoder outputs of the first step's global batch; EMA codebook only).
    pub init: CodebookInit,
    /// Lloyd rounds of the k-means initialisation.
    pub kmeans_iterations: u32,
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
            init: CodebookInit::Uniform,
            kmeans_iterations: 10,
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
        if !(1..=100).contains(&self.kmeans_iterations) {
            return Err(SectionError::new(
                "kmeans_iterations",
                format!(
                    "found {}, expected 1 to 100 Lloyd rounds",
                    self.kmeans_iterations
                ),
            ));
        }
        if self.codebook == CodebookLearning::Loss && self.init == CodebookInit::Kmeans {
            return Err(SectionError::new(
                "init",
                "found \"kmeans\" with codebook = \"loss\": the k-means initialisation starts the \
                 EMA statistics, so it needs codebook = \"ema\" (or init = \"uniform\")",
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

impl VqVaeConfig {
    fn codebook_settings(&self) -> CodebookSettings {
        CodebookSettings {
            learning: self.codebook,
            decay: self.decay,
            epsilon: self.epsilon,
            restart_threshold: self.restart_threshold,
            init_offset: self.init_offset,
            init: self.init,
            kmeans_iterations: self.kmeans_iterations as usize,
        }
    }
}

/// Stride-2 convolutions, a 3×3 convolution, residual blocks and a ReLU:
/// `(B, C, H, W) → (B, top, H/2ⁿ, W/2ⁿ)`, parameters `{name}.conv{i}`, `{name}.out`,
/// `{name}.res{i}`.
struct Encoder {
    convs: Vec<ConvLayer>,
    out: ConvLayer,
    res: Vec<ResidualBlock>,
    activation: Activation,
}

impl Encoder {
    fn new(
        p: &mut Params,
        name: &str,
        cin: usize,
        channels: &[usize],
        (blocks, hidden): (usize, usize),
        activation: Activation,
    ) -> Result<Self> {
        let mut convs = Vec::new();
        let mut c = cin;
        for (i, &cout) in channels.iter().enumerate() {
            let layer = format!("{name}.conv{i}");
            convs.push(ConvLayer::halving(p, &layer, c, cout, false)?);
            c = cout;
        }
        Ok(Encoder {
            convs,
            out: ConvLayer::same(p, &format!("{name}.out"), (c, c), 3)?,
            res: (0..blocks)
                .map(|i| ResidualBlock::new(p, &format!("{name}.res{i}"), c, hidden))
                .collect::<Result<_>>()?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut t = x.clone();
        for conv in &self.convs {
            t = conv.forward(&t, Some(self.activation))?;
        }
        t = self.out.forward(&t, None)?;
        for block in &self.res {
            t = block.forward(&t)?;
        }
        Ok(t.relu()?)
    }
}

/// A 3×3 convolution from `cin` to `chain[0]` channels, residual blocks and a ReLU, then
/// stride-2 transposed convolutions through `chain` (the activation between them, none after
/// the last); parameters `{name}.in`, `{name}.res{i}`, `{name}.deconv{i}`.
struct Decoder {
    input: ConvLayer,
    res: Vec<ResidualBlock>,
    deconvs: Vec<ConvLayer>,
    activation: Activation,
}

impl Decoder {
    fn new(
        p: &mut Params,
        name: &str,
        cin: usize,
        chain: &[usize],
        (blocks, hidden): (usize, usize),
        activation: Activation,
    ) -> Result<Self> {
        let width = chain[0];
        let input = ConvLayer::same(p, &format!("{name}.in"), (cin, width), 3)?;
        let res = (0..blocks)
            .map(|i| ResidualBlock::new(p, &format!("{name}.res{i}"), width, hidden))
            .collect::<Result<_>>()?;
        let deconvs = chain
            .windows(2)
            .enumerate()
            .map(|(i, w)| ConvLayer::halving(p, &format!("{name}.deconv{i}"), w[0], w[1], true))
            .collect::<Result<_>>()?;
        Ok(Decoder {
            input,
            res,
            deconvs,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut t = self.input.forward(x, None)?;
        for block in &self.res {
            t = block.forward(&t)?;
        }
        t = t.relu()?;
        let last = self.deconvs.len().saturating_sub(1);
        for (i, deconv) in self.deconvs.iter().enumerate() {
            t = deconv.forward(&t, (i < last).then_some(self.activation))?;
        }
        Ok(t)
    }
}

/// VQ-VAE-2's top level: encoder, quantiser, the decoder that conditions the bottom
/// quantiser, and the upsampling of its codes for the image decoder.
struct Top {
    encoder: Encoder,
    pre_vq: ConvLayer,
    quantiser: Quantiser,
    decoder: Decoder,
    upsample: ConvLayer,
}

/// Names of a level's terms: one level, then bottom and top of two.
const LEVEL_TERMS: [[&str; 3]; 4] = [
    ["codebook", "codebook_bottom", "codebook_top"],
    ["codes_alive", "codes_alive_bottom", "codes_alive_top"],
    ["commitment", "commitment_bottom", "commitment_top"],
    ["perplexity", "perplexity_bottom", "perplexity_top"],
];

/// A forward pass: each level's quantised batch (bottom first) and the decoder's output.
struct Pass {
    levels: Vec<Quantised>,
    out: Tensor,
}

/// The VQ-VAE, with one level of codes or (VQ-VAE-2) two.
pub struct VqVae {
    params: Params,
    buffers: Buffers,
    config: VqVaeConfig,
    likelihood: LikelihoodKind,
    variance: f64,
    /// Example shape (C, H, W).
    shape: (usize, usize, usize),
    /// The bottom code grid (h, w).
    grid: (usize, usize),
    encoder: Encoder,
    top: Option<Top>,
    pre_vq: ConvLayer,
    quantiser: Quantiser,
    decoder: Decoder,
}

impl VqVae {
    /// Builds a VQ-VAE of `levels` (1 or 2) levels of codes, parameters drawn from `seed`.
    pub fn new(
        spec: &ModelSpec,
        config: VqVaeConfig,
        levels: usize,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate().map_err(|e| {
            let kind = if levels == 2 { "vqvae2" } else { "vqvae" };
            ModelError::Spec(format!("[model.{kind}] {e}"))
        })?;
        if !(1..=2).contains(&levels) {
            return Err(ModelError::Spec(format!(
                "a VQ-VAE has 1 or 2 levels of codes, not {levels}"
            )));
        }
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
        let halvings = config.channels.len() + levels - 1;
        let factor = 1usize << halvings;
        if c == 0 || h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(ModelError::Spec(format!(
                "images of {c}×{h}×{w}: [model.vqvae] channels {:?} with {levels} level(s) of \
                 codes halve them {halvings} times, so their sides must be positive multiples \
                 of {factor}",
                config.channels
            )));
        }
        let dim = spec.latent_dim;
        if dim == 0 {
            return Err(ModelError::Spec(
                "model.latent_dim (the code dimension D) must be positive".into(),
            ));
        }
        let codes = config.codes as usize;
        let act = spec.activation;
        let res = (
            config.residual_blocks as usize,
            config.residual_hidden as usize,
        );
        let mut p = Params::new(device, seed);
        let mut buffers = Buffers::new(device);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0de_b00c);
        let settings = config.codebook_settings();
        let channels: Vec<usize> = config.channels.iter().map(|c| *c as usize).collect();
        let width = *channels.last().expect("validated non-empty");
        let grid = (h >> config.channels.len(), w >> config.channels.len());
        let encoder = Encoder::new(&mut p, "encoder", c, &channels, res, act)?;
        let bottom_name = if levels == 1 {
            "quantiser"
        } else {
            "quantiser.bottom"
        };
        let bottom_in = if levels == 1 { width } else { width + dim };
        let pre_vq = ConvLayer::same(&mut p, "encoder.pre_vq", (bottom_in, dim), 1)?;
        let quantiser = Quantiser::new(
            &mut p,
            &mut buffers,
            &mut rng,
            bottom_name,
            (codes, dim),
            grid.0 * grid.1,
            0,
            settings,
        )?;
        let top = if levels == 2 {
            let encoder = Encoder::new(&mut p, "top.encoder", width, &[width], res, act)?;
            let pre_vq = ConvLayer::same(&mut p, "top.pre_vq", (width, dim), 1)?;
            let decoder = Decoder::new(&mut p, "top.decoder", dim, &[width, dim], res, act)?;
            let upsample = ConvLayer::halving(&mut p, "top.upsample", dim, dim, true)?;
            let quantiser = Quantiser::new(
                &mut p,
                &mut buffers,
                &mut rng,
                "quantiser.top",
                (codes, dim),
                grid.0 / 2 * (grid.1 / 2),
                1,
                settings,
            )?;
            Some(Top {
                encoder,
                pre_vq,
                quantiser,
                decoder,
                upsample,
            })
        } else {
            None
        };
        let mut chain: Vec<usize> = channels.iter().rev().copied().collect();
        chain.push(c);
        let decoder_in = if levels == 1 { dim } else { 2 * dim };
        let decoder = Decoder::new(&mut p, "decoder", decoder_in, &chain, res, act)?;
        Ok(VqVae {
            params: p,
            buffers,
            likelihood: spec.likelihood,
            variance: spec.variance,
            shape: (c, h, w),
            grid,
            encoder,
            top,
            pre_vq,
            quantiser,
            decoder,
            config,
        })
    }

    /// The quantisers with the column of their terms in [`LEVEL_TERMS`]: bottom first.
    fn levels(&self) -> Vec<(usize, &Quantiser)> {
        match &self.top {
            None => vec![(0, &self.quantiser)],
            Some(top) => vec![(1, &self.quantiser), (2, &top.quantiser)],
        }
    }

    /// The image as the encoder reads it, `x − ½`: (B, C, H, W).
    fn image(&self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = self.shape;
        match x.dims() {
            [b, d] if *d == c * h * w => Ok(x.reshape((*b, c, h, w))?.affine(1.0, -0.5)?),
            dims => Err(ModelError::Input(format!(
                "examples of shape {dims:?}, expected (batch, {})",
                c * h * w
            ))),
        }
    }

    /// The bottom encoder outputs z_e of a one-level VQ-VAE: (B, D, h, w).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        if self.top.is_some() {
            return Err(ModelError::Input(
                "a two-level VQ-VAE's bottom encoding depends on its top codes".into(),
            ));
        }
        self.pre_vq
            .forward(&self.encoder.forward(&self.image(x)?)?, None)
    }

    /// Quantises every level (the top first; returned bottom first), against the codebooks or,
    /// at the step of a k-means initialisation, the centroids of `init` (the global sums of
    /// every k-means round, top level first).
    fn quantise_levels(&self, x: &Tensor, init: Option<&[f32]>) -> Result<Vec<Quantised>> {
        let features = self.encoder.forward(&self.image(x)?)?;
        let centroids = |q: &Quantiser, sums: Option<&[f32]>| -> Result<Option<Vec<f32>>> {
            sums.map(|s| q.init_centroids(s)).transpose()
        };
        match &self.top {
            None => {
                let book = centroids(&self.quantiser, init)?;
                let z = self.pre_vq.forward(&features, None)?;
                Ok(vec![self.quantiser.quantise(&z, book.as_deref())?])
            }
            Some(top) => {
                let split = top.quantiser.init_rounds().iter().sum();
                let (top_sums, bottom_sums) = match init {
                    Some(s) if s.len() >= split => (Some(&s[..split]), Some(&s[split..])),
                    Some(s) => return Err(init_sums_error(s.len())),
                    None => (None, None),
                };
                let top_book = centroids(&top.quantiser, top_sums)?;
                let (q_top, z) = self.two_levels(top, &features, top_book.as_deref())?;
                let book = centroids(&self.quantiser, bottom_sums)?;
                Ok(vec![self.quantiser.quantise(&z, book.as_deref())?, q_top])
            }
        }
    }

    /// VQ-VAE-2's top level quantised (against `top_book`, or its codebook) and the bottom
    /// encoding conditioned on it: the bottom features beside the decoded top codes.
    fn two_levels(
        &self,
        top: &Top,
        features: &Tensor,
        top_book: Option<&[f32]>,
    ) -> Result<(Quantised, Tensor)> {
        let q_top = top.quantiser.quantise(&top.encode(features)?, top_book)?;
        let condition = top.decoder.forward(&q_top.zq)?;
        let z = self
            .pre_vq
            .forward(&Tensor::cat(&[features, &condition], 1)?, None)?;
        Ok((q_top, z))
    }

    /// Whether a codebook waits for its k-means initialisation (every level's together).
    fn init_pending(&self) -> Result<bool> {
        self.quantiser.init_pending(&self.buffers)
    }

    /// The quantisers in the order of their k-means rounds: the top level first.
    fn init_order(&self) -> Vec<&Quantiser> {
        let mut order: Vec<&Quantiser> = self.levels().into_iter().map(|(_, q)| q).collect();
        order.reverse();
        order
    }

    /// Quantises every level and decodes (see [`VqVae::quantise_levels`] for `init`).
    fn forward(&self, x: &Tensor, init: Option<&[f32]>) -> Result<Pass> {
        let levels = self.quantise_levels(x, init)?;
        let out = self.decode(&levels[0].zq, levels.get(1).map(|q| &q.zq))?;
        Ok(Pass { levels, out })
    }

    /// The decoder's output for the bottom code vectors (B, D, h, w) and, with two levels,
    /// the top's: (B, C·H·W) logits (Bernoulli) or means in [−½, ½] coordinates (Gaussian).
    fn decode(&self, bottom: &Tensor, top: Option<&Tensor>) -> Result<Tensor> {
        let input = match (&self.top, top) {
            (Some(level), Some(t)) => Tensor::cat(&[&level.upsample.forward(t, None)?, bottom], 1)?,
            _ => bottom.clone(),
        };
        Ok(self.decoder.forward(&input)?.flatten_from(1)?)
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

    /// Decodes code grids of every level (bottom first; each `n` grids, row-major) to means
    /// in data space: (n, C·H·W).
    fn decode_levels(&self, codes: &[Vec<u32>], n: usize) -> Result<Tensor> {
        let bottom = self.quantiser.lookup(&codes[0], n, self.grid)?;
        let top = match &self.top {
            Some(level) => {
                let grid = (self.grid.0 / 2, self.grid.1 / 2);
                Some(level.quantiser.lookup(&codes[1], n, grid)?)
            }
            None => None,
        };
        self.mean(&self.decode(&bottom, top.as_ref())?)
    }
}

impl Top {
    /// The top level's encoder output z_e from the bottom encoder's features.
    fn encode(&self, features: &Tensor) -> Result<Tensor> {
        self.pre_vq.forward(&self.encoder.forward(features)?, None)
    }
}

/// The error of k-means sums too short for the top level's rounds.
fn init_sums_error(len: usize) -> ModelError {
    ModelError::Input(format!(
        "k-means sums of {len} values, fewer than the top level's rounds hold"
    ))
}

impl CodeModel for VqVae {
    fn code_grids(&self) -> Vec<CodeGrid> {
        self.levels()
            .iter()
            .enumerate()
            .map(|(level, (_, q))| CodeGrid {
                codes: q.codes(),
                height: self.grid.0 >> level,
                width: self.grid.1 >> level,
            })
            .collect()
    }

    fn example_len(&self) -> usize {
        self.shape.0 * self.shape.1 * self.shape.2
    }

    fn encode_codes(&self, x: &Tensor) -> Result<Vec<Vec<u32>>> {
        self.quantise_levels(x, None)?
            .iter()
            .map(Quantised::indices)
            .collect()
    }

    fn decode_codes(&self, codes: &[Vec<u32>], n: usize) -> Result<Tensor> {
        let grids = self.code_grids();
        if codes.len() != grids.len() {
            return Err(ModelError::Input(format!(
                "codes of {} grids, but the VQ-VAE has {}",
                codes.len(),
                grids.len()
            )));
        }
        for (c, g) in codes.iter().zip(&grids) {
            if c.len() != n * g.positions() || c.iter().any(|&i| i as usize >= g.codes) {
                return Err(ModelError::Input(format!(
                    "expected {n} grids of {}×{} codes below {}",
                    g.height, g.width, g.codes
                )));
            }
        }
        self.decode_levels(codes, n)
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
        let mut terms = vec!["loss", "mse", "rec"];
        for (col, _) in self.levels() {
            let rows = if self.config.codebook == CodebookLearning::Loss {
                &LEVEL_TERMS[..]
            } else {
                &LEVEL_TERMS[1..]
            };
            terms.extend(rows.iter().map(|names| names[col]));
        }
        terms.sort_unstable();
        Statistics {
            terms,
            batch: Vec::new(),
            update: self.levels().iter().map(|(_, q)| q.update_len()).sum(),
        }
    }

    fn batch_rounds(&self) -> Result<Vec<usize>> {
        if !self.init_pending()? {
            return Ok(Vec::new());
        }
        Ok(self
            .init_order()
            .iter()
            .flat_map(|q| q.init_rounds())
            .collect())
    }

    fn batch_statistics(
        &self,
        input: &Input<'_>,
        ctx: &StepContext<'_>,
        round: usize,
    ) -> Result<Tensor> {
        let features = self.encoder.forward(&self.image(input.x)?)?;
        let (mut first, mut offset) = (0, 0);
        for (level, q) in self.init_order().into_iter().enumerate() {
            let rounds = q.init_rounds();
            if round < first + rounds.len() {
                let before = ctx
                    .batch_stats
                    .get(..offset)
                    .ok_or_else(|| init_sums_error(ctx.batch_stats.len()))?;
                let z = match (&self.top, level) {
                    (None, _) => self.pre_vq.forward(&features, None)?,
                    (Some(top), 0) => top.encode(&features)?,
                    (Some(top), _) => {
                        let book = top.quantiser.init_centroids(before)?;
                        self.two_levels(top, &features, Some(&book))?.1
                    }
                };
                let sums = q.init_round_statistics(
                    &z,
                    input.ids,
                    ctx,
                    &ctx.batch_stats[offset..],
                    round - first,
                )?;
                let len = sums.len();
                return Ok(Tensor::from_vec(sums, len, input.x.device())?);
            }
            first += rounds.len();
            offset += rounds.iter().sum::<usize>();
        }
        Err(ModelError::Input(format!(
            "batch statistics round {round}: the VQ-VAE has {first} rounds this step"
        )))
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let initialising = self.init_pending()?;
        let init = if initialising {
            let want: usize = self.batch_rounds()?.iter().sum();
            if ctx.batch_stats.len() != want {
                return Err(ModelError::Input(format!(
                    "the codebooks' k-means initialisation needs the {want} sums of its rounds \
                     of batch statistics, found {}",
                    ctx.batch_stats.len()
                )));
            }
            Some(ctx.batch_stats)
        } else {
            None
        };
        let pass = self.forward(input.x, init)?;
        let (rec, mse) = self.reconstruction(&pass.out, input.x)?;
        let rows = input.ids.len();
        let mut per_row = rec.clone();
        let mut terms =
            BTreeMap::from([("mse", Term::per_row(&mse)?), ("rec", Term::per_row(&rec)?)]);
        let mut stats = Vec::new();
        for ((col, quantiser), q) in self.levels().into_iter().zip(&pass.levels) {
            per_row = (per_row + (&q.commitment * self.config.beta)?)?;
            if let Some(cb) = &q.codebook {
                per_row = (per_row + cb)?;
                terms.insert(LEVEL_TERMS[0][col], Term::per_row(cb)?);
            }
            let (alive, perplexity) = quantiser.usage_figures(&self.buffers)?;
            terms.insert(LEVEL_TERMS[1][col], Term::repeated(&alive, rows)?);
            terms.insert(LEVEL_TERMS[2][col], Term::per_row(&q.commitment)?);
            terms.insert(LEVEL_TERMS[3][col], Term::repeated(&perplexity, rows)?);
            stats.push(quantiser.update_statistics(q, input.ids, ctx, initialising)?);
        }
        terms.insert("loss", Term::per_row(&per_row)?);
        let loss = (per_row.sum_all()? / ctx.global_rows as f64)?;
        Ok(LossOutput {
            loss,
            terms,
            update_stats: Some(Tensor::cat(&stats, 0)?),
        })
    }

    fn update_state(&mut self, stats: &[f32], _step: u64) -> Result<()> {
        let want: usize = self.levels().iter().map(|(_, q)| q.update_len()).sum();
        if stats.len() != want {
            return Err(ModelError::Input(format!(
                "VQ-VAE update statistics of {} values, expected {want}",
                stats.len()
            )));
        }
        let mut at = 0;
        for (_, quantiser) in self.levels() {
            let len = quantiser.update_len();
            quantiser.update_state(&self.buffers, &stats[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    fn evaluator<'a>(&'a self, _options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(VqEvaluator {
            model: self,
            rows: 0,
            rec: 0.0,
            mse: 0.0,
            levels: self
                .levels()
                .iter()
                .map(|(_, q)| LevelFigures {
                    commitment: 0.0,
                    codebook: 0.0,
                    counts: vec![0.0; q.codes()],
                })
                .collect(),
        }))
    }

    fn sample(
        &self,
        n: usize,
        seed: u64,
        _labels: Option<&[i64]>,
        _device: &Device,
    ) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de);
        let codes = self
            .levels()
            .iter()
            .map(|(_, q)| q.draw_codes(&self.buffers, n, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        self.decode_levels(&codes, n)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        self.mean(&self.forward(input.x, None)?.out)
    }

    fn codes(&self) -> Option<&dyn CodeModel> {
        Some(self)
    }

    /// One level: `codes.png`, what each code draws when it fills the grid (the first 128
    /// codes). Each level: `code_usage[_bottom|_top].png`, one tile per code filled from the
    /// bottom in proportion to its EMA usage (the fullest tile is the most used code).
    fn pictures(&self, _input: &Input<'_>) -> Result<Vec<Picture>> {
        let mut pictures = Vec::new();
        let cols = 16;
        if self.top.is_none() {
            let shown = self.quantiser.codes().min(128);
            let positions = self.grid.0 * self.grid.1;
            let codes: Vec<u32> = (0..shown as u32)
                .flat_map(|k| std::iter::repeat_n(k, positions))
                .collect();
            let drawn = self
                .decode_codes(&[codes], shown)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            pictures.push(Picture {
                name: "codes".into(),
                values: drawn,
                cols,
            });
        }
        let (c, h, w) = self.shape;
        for (col, quantiser) in self.levels() {
            let usage = quantiser.usage(&self.buffers)?;
            let most = usage
                .iter()
                .copied()
                .fold(0f32, f32::max)
                .max(f32::MIN_POSITIVE);
            let mut bars = Vec::with_capacity(usage.len() * c * h * w);
            for u in &usage {
                let filled = ((u / most).clamp(0.0, 1.0) * h as f32).round() as usize;
                for _ in 0..c {
                    for y in 0..h {
                        let on = if y >= h - filled { 1.0 } else { 0.0 };
                        bars.extend(std::iter::repeat_n(on, w));
                    }
                }
            }
            let suffix = ["", "_bottom", "_top"][col];
            pictures.push(Picture {
                name: format!("code_usage{suffix}"),
                values: bars,
                cols,
            });
        }
        Ok(pictures)
    }
}

/// A level's test figures.
struct LevelFigures {
    commitment: f64,
    codebook: f64,
    counts: Vec<f64>,
}

/// The VQ-VAE's test figures: reconstruction, and each level's commitment and code usage over
/// the whole test set.
struct VqEvaluator<'a> {
    model: &'a VqVae,
    rows: u64,
    rec: f64,
    mse: f64,
    levels: Vec<LevelFigures>,
}

fn sum(t: &Tensor) -> Result<f64> {
    Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Evaluator for VqEvaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        let m = self.model;
        let pass = m.forward(input.x, None)?;
        let (rec, mse) = m.reconstruction(&pass.out, input.x)?;
        self.rec += sum(&rec)?;
        self.mse += sum(&mse)?;
        for ((figures, q), (_, quantiser)) in
            self.levels.iter_mut().zip(pass.levels).zip(m.levels())
        {
            figures.commitment += sum(&q.commitment)?;
            if let Some(cb) = &q.codebook {
                figures.codebook += sum(cb)?;
            }
            for (total, n) in figures.counts.iter_mut().zip(quantiser.counts(&q)?) {
                *total += f64::from(n);
            }
        }
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let n = self.rows.max(1) as f64;
        let m = self.model;
        let codebook_loss = m.config.codebook == CodebookLearning::Loss;
        let mut loss = self.rec;
        let mut out = Metrics::from([
            ("rec".to_string(), Metric::Value(self.rec / n)),
            ("mse".to_string(), Metric::Value(self.mse / n)),
            (
                "codes".to_string(),
                Metric::Count(u64::from(m.config.codes)),
            ),
        ]);
        for ((col, _), figures) in m.levels().into_iter().zip(&self.levels) {
            let suffix = ["", "_bottom", "_top"][col];
            loss += m.config.beta * figures.commitment;
            let used = figures.counts.iter().filter(|c| **c > 0.0).count();
            let mut put = |key: &str, value: Metric| out.insert(format!("{key}{suffix}"), value);
            put("commitment", Metric::Value(figures.commitment / n));
            put("perplexity", Metric::Value(perplexity(&figures.counts)));
            put("codes_used", Metric::Count(used as u64));
            if codebook_loss {
                loss += figures.codebook;
                put("codebook", Metric::Value(figures.codebook / n));
            }
        }
        out.insert("loss".to_string(), Metric::Value(loss / n));
        if m.likelihood == LikelihoodKind::GaussianFixed {
            out.insert("nmse".to_string(), Metric::Value(self.mse / n / m.variance));
        }
        out
    }
}

impl VqVae {
    /// A model of `levels` levels for the registry.
    fn boxed(
        spec: &ModelSpec,
        config: &VqVaeConfig,
        levels: usize,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Model>> {
        Ok(Box::new(VqVae::new(
            spec,
            config.clone(),
            levels,
            &ctx.device,
            ctx.seed,
        )?))
    }
}

impl Variant for VqVae {
    const KIND: &'static str = "vqvae";
    const ABOUT: &'static str = "VQ-VAE: nearest-code quantiser, straight-through gradient, EMA \
                                 codebook reduced across workers, dead-code restart";
    type Config = VqVaeConfig;

    fn build(spec: &ModelSpec, config: &VqVaeConfig, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        VqVae::boxed(spec, config, 1, ctx)
    }
}

/// VQ-VAE-2: the VQ-VAE with a top level of codes at half the bottom grid's resolution.
pub struct VqVae2;

impl Variant for VqVae2 {
    const KIND: &'static str = "vqvae2";
    const ABOUT: &'static str = "VQ-VAE-2: two levels of codes (top at half the bottom's \
                                 resolution), the bottom quantiser conditioned on the decoded top";
    type Config = VqVaeConfig;

    fn build(spec: &ModelSpec, config: &VqVaeConfig, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        VqVae::boxed(spec, config, 2, ctx)
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
        let m = VqVae::new(&spec, config, 1, &Device::Cpu, 0).unwrap();
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
        let q = m.quantiser.quantise(z.as_tensor(), None).unwrap();
        // (0.5, 0.5) is as near code 0 as code 1: the lower index wins.
        assert_eq!(q.indices().unwrap(), vec![0, 1, 2, 0]);
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
