//! A learned prior over a trained VQ-VAE's code grids (kind `code_prior`), so that sampling a
//! VQ model draws grids the data would produce instead of independent codes.
//!
//! **Model.** One gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with
//! PixelCNN Decoders") per code grid. Codes are embedded to `channels` features; each gated
//! layer has a vertical stack (a k×k convolution seeing only the rows above, the first layer's
//! strictly above) and a horizontal stack (a 1×k convolution seeing only the positions to the
//! left, the first layer's strictly left) that also reads the vertical stack at its position,
//! both through `tanh(a)·σ(b)` gates; the horizontal stack is residual after the first layer.
//! Two stacks leave no blind spot: with enough layers every earlier position reaches every
//! later one. A 1×1 head gives K logits per position. The convolutions are the fused ones of
//! the conv layers reading only the taps their masks keep (a masked-out tap costs neither
//! columns nor products, and its weight gets no gradient).
//!
//! **Two grids** (a VQ-VAE-2 run): the top grid's PixelCNN is unconditional; the bottom's is
//! conditioned on the top codes, embedded, upsampled to the bottom grid by repetition and
//! added through 1×1 convolutions to both stacks' gates of every layer — the paper's
//! hierarchy. Sampling draws the top grid, then the bottom grid given it.
//!
//! **Data.** The VQ run's encoder turns each training batch into codes on the fly (it is
//! frozen: its parameters are not the prior's, and no gradient reaches them); no file of codes
//! is written. The objective is each example's negative log-likelihood of its codes (nats per
//! example, summed over positions and grids), averaged over the global batch; `bits_per_dim`
//! is the same per code position, in bits — the figure the VQ-VAE-2 paper reports for its
//! priors.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gate::gated_tanh;
use crate::layers::{Activation, ConvLayer};
use crate::model::{
    CodeGrid, CodeModel, EvalOptions, Evaluator, Input, LossOutput, Metric, Metrics, Model,
    Statistics, StepContext, Term,
};
use crate::params::Params;
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{BuildContext, ModelSpec};

/// `[model.code_prior]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodePriorConfig {
    /// The directory of the trained VQ-VAE (or VQ-VAE-2) run whose codes the prior models.
    pub vq_run: String,
    /// Features of each PixelCNN layer.
    pub channels: u32,
    /// Gated layers of each PixelCNN.
    pub layers: u32,
    /// Side of the vertical stack's kernel and width of the horizontal one's (odd).
    pub kernel: u32,
}

impl Default for CodePriorConfig {
    fn default() -> Self {
        CodePriorConfig {
            vq_run: String::new(),
            channels: 64,
            layers: 8,
            kernel: 3,
        }
    }
}

impl Section for CodePriorConfig {
    fn validate(&self) -> Result<(), SectionError> {
        if self.vq_run.trim().is_empty() {
            return Err(SectionError::new(
                "vq_run",
                "is empty: expected the directory of a trained vqvae or vqvae2 run",
            ));
        }
        if !(1..=1024).contains(&self.channels) {
            return Err(SectionError::new(
                "channels",
                format!("found {}, expected 1 to 1024", self.channels),
            ));
        }
        if !(1..=64).contains(&self.layers) {
            return Err(SectionError::new(
                "layers",
                format!("found {}, expected 1 to 64", self.layers),
            ));
        }
        if !(3..=9).contains(&self.kernel) || self.kernel % 2 == 0 {
            return Err(SectionError::new(
                "kernel",
                format!("found {}, expected an odd size from 3 to 9", self.kernel),
            ));
        }
        Ok(())
    }

    fn base_run(&self) -> Option<&str> {
        Some(&self.vq_run)
    }
}

/// Which taps of a k×k kernel a masked convolution keeps (centre at (k/2, k/2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mask {
    /// The rows above the centre, and the centre row too if `centre_row`.
    Vertical { centre_row: bool },
    /// The centre row's taps left of the centre, and the centre too if `centre`.
    Horizontal { centre: bool },
}

impl Mask {
    fn keeps(self, row: usize, col: usize, k: usize) -> bool {
        let c = k / 2;
        match self {
            Mask::Vertical { centre_row } => row < c || (centre_row && row == c),
            Mask::Horizontal { centre } => row == c && (col < c || (centre && col == c)),
        }
    }
}

/// A stride-1, size-keeping k×k convolution reading only the taps `mask` keeps (the others'
/// weights are unused and get no gradient).
fn masked(
    params: &mut Params,
    name: &str,
    channels: (usize, usize),
    k: usize,
    mask: Mask,
) -> Result<ConvLayer> {
    let taps = (0..k * k)
        .filter(|t| mask.keeps(t / k, t % k, k))
        .fold(0u128, |m, t| m | (1 << t));
    ConvLayer::masked(params, name, channels, k, taps)
}

/// A 1×1 convolution (a dense layer at every position), the conv layers' own.
fn pointwise(params: &mut Params, name: &str, channels: (usize, usize)) -> Result<ConvLayer> {
    ConvLayer::same(params, name, channels, 1)
}

/// One gated layer: the two stacks, the vertical-to-horizontal link, the horizontal output
/// and, in a conditional PixelCNN, the condition's projections into both gates.
#[derive(Debug, Clone)]
struct GatedLayer {
    vertical: ConvLayer,
    horizontal: ConvLayer,
    v_to_h: ConvLayer,
    out: ConvLayer,
    condition: Option<(ConvLayer, ConvLayer)>,
    residual: bool,
}

impl GatedLayer {
    fn new(
        params: &mut Params,
        name: &str,
        channels: usize,
        k: usize,
        first: bool,
        conditional: bool,
    ) -> Result<Self> {
        let c2 = (channels, 2 * channels);
        let condition = if conditional {
            Some((
                pointwise(params, &format!("{name}.condition_v"), c2)?,
                pointwise(params, &format!("{name}.condition_h"), c2)?,
            ))
        } else {
            None
        };
        Ok(GatedLayer {
            vertical: masked(
                params,
                &format!("{name}.vertical"),
                c2,
                k,
                Mask::Vertical { centre_row: !first },
            )?,
            horizontal: masked(
                params,
                &format!("{name}.horizontal"),
                c2,
                k,
                Mask::Horizontal { centre: !first },
            )?,
            v_to_h: pointwise(
                params,
                &format!("{name}.v_to_h"),
                (2 * channels, 2 * channels),
            )?,
            out: pointwise(params, &format!("{name}.out"), (channels, channels))?,
            condition,
            residual: !first,
        })
    }

    /// `(v, h)` → the layer's `(v, h)`, each (B, C, h, w).
    fn forward(
        &self,
        v: &Tensor,
        h: &Tensor,
        condition: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let mut v_pre = self.vertical.forward(v, None)?;
        let mut h_pre = (self.horizontal.forward(h, None)? + self.v_to_h.forward(&v_pre, None)?)?;
        if let (Some((to_v, to_h)), Some(c)) = (&self.condition, condition) {
            v_pre = (v_pre + to_v.forward(c, None)?)?;
            h_pre = (h_pre + to_h.forward(c, None)?)?;
        }
        let mut h_out = self.out.forward(&gated_tanh(&h_pre)?, None)?;
        if self.residual {
            h_out = (h_out + h)?;
        }
        Ok((gated_tanh(&v_pre)?, h_out))
    }
}

/// Checks `len` codes each below `codes`.
fn check_codes(what: &str, values: &[u32], len: usize, codes: usize) -> Result<()> {
    if values.len() != len {
        return Err(ModelError::Input(format!(
            "{what}: {} values, expected {len}",
            values.len()
        )));
    }
    match values.iter().find(|&&c| c as usize >= codes) {
        Some(c) => Err(ModelError::Input(format!(
            "{what}: code {c}, expected codes below {codes}"
        ))),
        None => Ok(()),
    }
}

/// A gated PixelCNN over one grid of codes, optionally conditioned on a coarser grid's codes.
#[derive(Debug, Clone)]
pub struct PixelCnn {
    grid: CodeGrid,
    embedding: Tensor,
    /// The condition's embedding and how many times each of its codes repeats along each side.
    condition: Option<(Tensor, usize)>,
    layers: Vec<GatedLayer>,
    head: ConvLayer,
    logits: ConvLayer,
}

impl PixelCnn {
    /// A PixelCNN over `grid`, parameters `{name}.*`, conditioned on a grid `condition`
    /// (codes, upsampling factor) if given.
    pub fn new(
        params: &mut Params,
        name: &str,
        grid: CodeGrid,
        condition: Option<(usize, usize)>,
        (channels, layers, kernel): (usize, usize, usize),
    ) -> Result<Self> {
        if grid.codes == 0 || grid.positions() == 0 || channels == 0 || layers == 0 {
            return Err(ModelError::Spec(format!(
                "a PixelCNN needs codes, positions, channels and layers, not {grid:?}, {channels} channels, {layers} layers"
            )));
        }
        let embedding =
            params.uniform(&format!("{name}.embedding"), &[grid.codes, channels], 1.0)?;
        let condition = match condition {
            Some((codes, factor)) => Some((
                params.uniform(&format!("{name}.condition"), &[codes, channels], 1.0)?,
                factor,
            )),
            None => None,
        };
        let layers = (0..layers)
            .map(|l| {
                GatedLayer::new(
                    params,
                    &format!("{name}.layer{l}"),
                    channels,
                    kernel,
                    l == 0,
                    condition.is_some(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PixelCnn {
            grid,
            embedding,
            condition,
            head: pointwise(params, &format!("{name}.head"), (channels, channels))?,
            logits: pointwise(params, &format!("{name}.logits"), (channels, grid.codes))?,
            layers,
        })
    }

    /// Rows of `table` for `codes`, laid out as `n` grids of (C, h, w).
    fn embed(table: &Tensor, codes: &[u32], n: usize, (h, w): (usize, usize)) -> Result<Tensor> {
        let idx = Tensor::from_slice(codes, codes.len(), table.device())?;
        let c = table.dim(1)?;
        Ok(table
            .index_select(&idx, 0)?
            .reshape((n, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// The condition's codes repeated to this grid's positions.
    fn upsample(&self, codes: &[u32], n: usize, factor: usize) -> Vec<u32> {
        let (h, w) = (self.grid.height, self.grid.width);
        let (ch, cw) = (h / factor, w / factor);
        let mut out = Vec::with_capacity(n * h * w);
        for i in 0..n {
            for y in 0..h {
                for x in 0..w {
                    out.push(codes[i * ch * cw + (y / factor) * cw + x / factor]);
                }
            }
        }
        out
    }

    /// The logits (B, K, h, w) of embedded inputs `x` (B, C, h, w) and an embedded condition.
    pub fn forward_embedded(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let (mut v, mut h) = (x.clone(), x.clone());
        for layer in &self.layers {
            (v, h) = layer.forward(&v, &h, condition)?;
        }
        let hidden = self.head.forward(&h.relu()?, Some(Activation::Relu))?;
        self.logits.forward(&hidden, None)
    }

    /// Log-probabilities (n·h·w, K) of every code at every position of `n` grids `codes`
    /// (row-major), given the condition's codes when conditional.
    fn log_probs(&self, codes: &[u32], condition: Option<&[u32]>, n: usize) -> Result<Tensor> {
        let side = (self.grid.height, self.grid.width);
        check_codes("codes", codes, n * self.grid.positions(), self.grid.codes)?;
        if let (Some((table, factor)), Some(c)) = (&self.condition, condition) {
            let positions = self.grid.positions() / (factor * factor);
            check_codes("condition codes", c, n * positions, table.dim(0)?)?;
        }
        let x = Self::embed(&self.embedding, codes, n, side)?;
        let cond =
            match (&self.condition, condition) {
                (Some((table, factor)), Some(c)) => {
                    Some(Self::embed(table, &self.upsample(c, n, *factor), n, side)?)
                }
                (None, None) => None,
                _ => return Err(ModelError::Input(
                    "a conditional PixelCNN needs its condition's codes, an unconditional one none"
                        .into(),
                )),
            };
        let logits = self.forward_embedded(&x, cond.as_ref())?;
        let k = self.grid.codes;
        Ok(log_softmax(
            &logits
                .permute((0, 2, 3, 1))?
                .reshape((n * self.grid.positions(), k))?,
            D::Minus1,
        )?)
    }

    /// Each grid's negative log-likelihood of its codes, in nats: (n,). `codes` holds `n`
    /// grids row-major; `condition` the coarser grid's codes of a conditional PixelCNN.
    pub fn nll(&self, codes: &[u32], condition: Option<&[u32]>, n: usize) -> Result<Tensor> {
        let log_p = self.log_probs(codes, condition, n)?;
        let idx = Tensor::from_slice(codes, (codes.len(), 1), log_p.device())?;
        Ok(log_p
            .gather(&idx, 1)?
            .reshape((n, self.grid.positions()))?
            .sum(D::Minus1)?
            .neg()?)
    }

    /// Draws `n` grids position by position (raster order), given the coarser grid's codes
    /// of a conditional PixelCNN.
    pub fn draw(
        &self,
        condition: Option<&[u32]>,
        n: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<u32>> {
        let positions = self.grid.positions();
        let mut codes = vec![0u32; n * positions];
        for p in 0..positions {
            let probs = softmax(&self.log_probs(&codes, condition, n)?, D::Minus1)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for i in 0..n {
                let row = &probs[i * positions + p];
                let u: f32 = rng.random();
                let mut acc = 0.0;
                let mut pick = row.len() - 1;
                for (code, q) in row.iter().enumerate() {
                    acc += q;
                    if u < acc {
                        pick = code;
                        break;
                    }
                }
                codes[i * positions + p] = pick as u32;
            }
        }
        Ok(codes)
    }
}

/// The prior over a VQ run's code grids.
pub struct CodePrior {
    params: Params,
    base: Box<dyn Model>,
    grids: Vec<CodeGrid>,
    /// One PixelCNN per grid, bottom first; each but the top conditioned on the grid above.
    nets: Vec<PixelCnn>,
}

/// What the prior reports: with one grid `bits_per_dim` and `loss`; with two, per grid too.
const TERMS_ONE: [&str; 2] = ["bits_per_dim", "loss"];
const TERMS_TWO: [&str; 4] = [
    "bits_per_dim",
    "bits_per_dim_bottom",
    "bits_per_dim_top",
    "loss",
];

impl CodePrior {
    /// A prior over `base`'s code grids (a model with [`Model::codes`]), for examples of
    /// `spec.input_shape`, parameters drawn from `seed`.
    pub fn new(
        spec: &ModelSpec,
        cfg: &CodePriorConfig,
        base: Box<dyn Model>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let codes = base.codes().ok_or_else(|| {
            ModelError::Spec(format!(
                "model.code_prior.vq_run = {:?}: that run's model has no code grids (expected a vqvae or vqvae2 run)",
                cfg.vq_run
            ))
        })?;
        let dim: usize = spec.input_shape.iter().product();
        if codes.example_len() != dim {
            return Err(ModelError::Spec(format!(
                "model.code_prior.vq_run = {:?} encodes examples of {} values, but data.train's have {dim} (shape {:?}): train the prior on the VQ run's data",
                cfg.vq_run,
                codes.example_len(),
                spec.input_shape
            )));
        }
        let grids = codes.code_grids();
        if grids.is_empty() || grids.len() > 2 {
            return Err(ModelError::Spec(format!(
                "a code prior models one or two grids, the VQ run has {}",
                grids.len()
            )));
        }
        let mut params = Params::new(device, seed);
        let arch = (
            cfg.channels as usize,
            cfg.layers as usize,
            cfg.kernel as usize,
        );
        let names = if grids.len() == 1 {
            vec!["prior"]
        } else {
            vec!["prior.bottom", "prior.top"]
        };
        let mut nets = Vec::with_capacity(grids.len());
        for (g, grid) in grids.iter().enumerate() {
            let condition = match grids.get(g + 1) {
                Some(above) => {
                    let factor = grid.height / above.height;
                    if factor == 0
                        || grid.height != above.height * factor
                        || grid.width != above.width * factor
                    {
                        return Err(ModelError::Spec(format!(
                            "grids {}×{} and {}×{}: the finer is not a whole multiple of the coarser",
                            grid.height, grid.width, above.height, above.width
                        )));
                    }
                    Some((above.codes, factor))
                }
                None => None,
            };
            nets.push(PixelCnn::new(
                &mut params,
                names[g],
                *grid,
                condition,
                arch,
            )?);
        }
        Ok(CodePrior {
            params,
            base,
            grids,
            nets,
        })
    }

    fn code_model(&self) -> &dyn CodeModel {
        self.base.codes().expect("checked when built")
    }

    /// Each example's NLL per grid (nats, (B,) each, bottom first) of the codes of `x`.
    fn grid_nlls(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let codes = self.code_model().encode_codes(&x.detach())?;
        let n = x.dim(0)?;
        self.nets
            .iter()
            .enumerate()
            .map(|(g, net)| net.nll(&codes[g], codes.get(g + 1).map(Vec::as_slice), n))
            .collect()
    }

    fn bits(&self, nll: &Tensor, positions: usize) -> Result<Tensor> {
        Ok((nll / (positions as f64 * std::f64::consts::LN_2))?)
    }

    fn positions(&self) -> usize {
        self.grids.iter().map(CodeGrid::positions).sum()
    }
}

impl Model for CodePrior {
    fn params(&self) -> &Params {
        &self.params
    }

    fn statistics(&self) -> Statistics {
        Statistics {
            terms: if self.grids.len() == 1 {
                TERMS_ONE.to_vec()
            } else {
                TERMS_TWO.to_vec()
            },
            batch: Vec::new(),
            update: 0,
        }
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let nlls = self.grid_nlls(input.x)?;
        let mut total = nlls[0].clone();
        for nll in &nlls[1..] {
            total = (total + nll)?;
        }
        let mut terms = BTreeMap::from([
            ("loss", Term::per_row(&total)?),
            (
                "bits_per_dim",
                Term::per_row(&self.bits(&total, self.positions())?)?,
            ),
        ]);
        if nlls.len() == 2 {
            for (g, name) in ["bits_per_dim_bottom", "bits_per_dim_top"]
                .iter()
                .enumerate()
            {
                let bits = self.bits(&nlls[g], self.grids[g].positions())?;
                terms.insert(name, Term::per_row(&bits)?);
            }
        }
        Ok(LossOutput {
            loss: (total.sum_all()? / ctx.global_rows as f64)?,
            terms,
            update_stats: None,
        })
    }

    fn evaluator<'a>(&'a self, _options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(PriorEvaluator {
            prior: self,
            rows: 0,
            nats: vec![0.0; self.grids.len()],
        }))
    }

    /// Grids drawn from the prior (the top first, then each finer one given it), decoded
    /// through the VQ run.
    fn sample(
        &self,
        n: usize,
        seed: u64,
        _labels: Option<&[i64]>,
        _device: &Device,
    ) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e1c_c0de);
        let mut codes: Vec<Vec<u32>> = vec![Vec::new(); self.nets.len()];
        for g in (0..self.nets.len()).rev() {
            let drawn = {
                let condition = codes.get(g + 1).map(Vec::as_slice);
                self.nets[g].draw(condition, n, &mut rng)?
            };
            codes[g] = drawn;
        }
        self.code_model().decode_codes(&codes, n)
    }

    /// The VQ run's reconstructions (the prior does not change them).
    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        self.base.reconstruct(input)
    }
}

/// Test figures of the prior: NLL per example and bits per code position, per grid too.
struct PriorEvaluator<'a> {
    prior: &'a CodePrior,
    rows: u64,
    nats: Vec<f64>,
}

impl Evaluator for PriorEvaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        for (acc, nll) in self.nats.iter_mut().zip(self.prior.grid_nlls(input.x)?) {
            *acc += nll.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let rows = self.rows.max(1) as f64;
        let per_bits =
            |nats: f64, positions: usize| nats / rows / (positions as f64 * std::f64::consts::LN_2);
        let total: f64 = self.nats.iter().sum();
        let mut m = Metrics::new();
        m.insert("nll".into(), Metric::Value(total / rows));
        m.insert(
            "bits_per_dim".into(),
            Metric::Value(per_bits(total, self.prior.positions())),
        );
        if self.nats.len() == 2 {
            for (g, name) in ["bits_per_dim_bottom", "bits_per_dim_top"]
                .iter()
                .enumerate()
            {
                m.insert(
                    (*name).into(),
                    Metric::Value(per_bits(self.nats[g], self.prior.grids[g].positions())),
                );
            }
        }
        m
    }
}

impl Variant for CodePrior {
    const KIND: &'static str = "code_prior";
    const ABOUT: &'static str =
        "gated PixelCNN prior over a trained VQ-VAE's codes, for sampling; [model.code_prior] vq_run, channels, layers, kernel";
    type Config = CodePriorConfig;

    fn build(
        spec: &ModelSpec,
        cfg: &CodePriorConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Model>> {
        let base = ctx.base.take().ok_or_else(|| {
            ModelError::Spec(format!(
                "code_prior needs the trained run model.code_prior.vq_run = {:?}, loaded by the program; none was given",
                cfg.vq_run
            ))
        })?;
        Ok(Box::new(CodePrior::new(
            spec,
            cfg,
            base,
            &ctx.device,
            ctx.seed,
        )?))
    }
}
