//! The ladder VAE (Sønderby et al. 2016): L stochastic layers over MLPs, a deterministic
//! bottom-up pass, a top-down generative path and the **precision-weighted merge** of the two
//! for each posterior.
//!
//! **Bottom-up.** `d_i = MLP_i(d_{i−1})` (`d_0 = x`, `depth` dense layers each, activated),
//! and from each `d_i` an estimate `(μ̂_i, log σ̂²_i)` by two linear heads.
//!
//! **Top-down.** `q(z_L|x) = N(μ̂_L, σ̂²_L)` against `p(z_L) = N(0, I)`. Below it, an MLP of
//! `z_{i+1}` gives the prior `p(z_i|z_{i+1}) = N(μ_p, σ²_p)`, and the posterior merges the two
//! estimates by precision: `σ²_q = 1/(σ̂⁻² + σ_p⁻²)`, `μ_q = (μ̂σ̂⁻² + μ_pσ_p⁻²)σ²_q`; `z_i` is
//! drawn from it (reparameterised) and the decoder reads `z_1`: `p(x|z_1)` through an MLP
//! mirroring the bottom-up sizes.
//!
//! **Objective.** Reconstruction plus each layer's KL against its prior given the sampled
//! parent — analytic, both being Gaussian — with `[model]`'s β, KL warm-up and free bits
//! (per latent dimension across all layers, on the global batch's mean KL: its sums are the
//! batch statistics, all-reduced before the loss). Per-layer KL is reported as `kl_layer{i}`
//! (1 = the bottom).
//!
//! **Evaluation.** `kl_layers` and `active_units_layers` (posterior means of a noiseless
//! top-down pass), and the IW bound over the joint of all layers:
//! `log w = log p(x|z_1) + Σ_i [log p(z_i|z_{i+1}) − log q(z_i|x, z_{i+1})]`.
//!
//! The top layer's size is `model.latent_dim`; `[model.ladder] latent_dims` lists the layers
//! below it (bottom first) and `hidden` one deterministic size per layer (bottom first).
//!
//! **Over images** (`model.architecture = "conv"`, square images of 28, 32 or 64 pixels) the
//! first bottom-up block reads the features of a stride-2 convolutional stack (as the conv VAE's
//! encoder), and the decoder's block feeds its mirror of transposed convolutions; the blocks
//! above the first stay dense, the latents vectors.
//!
//! **Batch norm** (`batch_norm`) normalises every hidden dense layer of every block by the
//! global batch's moments, with batch norm's exact gradient ([`crate::Norms`]).

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::batch_norm::{BatchNorm, NormedMlp, Norming, Norms, Round};
use crate::buffers::Buffers;
use crate::error::{ModelError, Result};
use crate::iwae::{iw_bound, ActiveUnits};
use crate::layers::{linear, linear_weight_normed, ConvDecoder, ConvEncoder, Linear, Mlp};
use crate::likelihood::Likelihood;
use crate::model::{
    EvalOptions, Evaluator, Input, LossOutput, Metric, Metrics, Model, Picture, Statistics,
    StepContext, Term,
};
use crate::noise::{Noise, Purpose};
use crate::objective::{free_bits_statistics, gaussian_kl, vae_loss, VAE_TERMS};
use crate::params::Params;
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{Architecture, BuildContext, ModelSpec};
use crate::vae::traversal_grid;

/// Most stochastic layers.
pub const MAX_LAYERS: usize = 5;

/// The per-layer KL terms, bottom first.
const KL_LAYERS: [&str; MAX_LAYERS] = [
    "kl_layer1",
    "kl_layer2",
    "kl_layer3",
    "kl_layer4",
    "kl_layer5",
];

/// `[model.ladder]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LadderConfig {
    /// Sizes of the stochastic layers below the top (bottom first); the top's is
    /// `model.latent_dim`.
    pub latent_dims: Vec<u32>,
    /// Width of each layer's deterministic block, bottom first (one per stochastic layer).
    pub hidden: Vec<u32>,
    /// Dense layers in each deterministic block (bottom-up, top-down and decoder).
    pub depth: u32,
    /// Weight normalisation (Salimans & Kingma 2016) of every dense layer: `W = g·V/‖V‖`.
    pub weight_norm: bool,
    /// Batch normalisation of every hidden dense layer (bottom-up, top-down and decoder
    /// blocks) by the moments of the global batch, with batch norm's exact gradient (see
    /// [`crate::Norms`]); running moments for evaluation and sampling.
    pub batch_norm: bool,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            latent_dims: vec![32],
            hidden: vec![512, 256],
            depth: 1,
            weight_norm: false,
            batch_norm: false,
        }
    }
}

impl Section for LadderConfig {
    fn validate(&self) -> Result<(), SectionError> {
        if self.latent_dims.is_empty() || self.latent_dims.len() >= MAX_LAYERS {
            return Err(SectionError::new(
                "latent_dims",
                format!(
                    "found {:?}, expected 1 to {} sizes: the layers below the top (a ladder has \
                     2 to {MAX_LAYERS} stochastic layers; the top's size is model.latent_dim)",
                    self.latent_dims,
                    MAX_LAYERS - 1
                ),
            ));
        }
        if self.latent_dims.contains(&0) {
            return Err(SectionError::new(
                "latent_dims",
                format!("{:?} holds a 0, expected positive sizes", self.latent_dims),
            ));
        }
        if self.hidden.len() != self.latent_dims.len() + 1 || self.hidden.contains(&0) {
            return Err(SectionError::new(
                "hidden",
                format!(
                    "found {:?}, expected {} positive widths: one per stochastic layer ({} in \
                     latent_dims and the top)",
                    self.hidden,
                    self.latent_dims.len() + 1,
                    self.latent_dims.len()
                ),
            ));
        }
        if self.weight_norm && self.batch_norm {
            return Err(SectionError::new(
                "batch_norm",
                "and weight_norm are both on, expected at most one normalisation of the \
                 dense layers",
            ));
        }
        if !(1..=8).contains(&self.depth) {
            return Err(SectionError::new(
                "depth",
                format!("found {}, expected 1 to 8 dense layers a block", self.depth),
            ));
        }
        Ok(())
    }
}

/// A Gaussian by mean and log-variance.
#[derive(Debug, Clone)]
struct Gaussian {
    mu: Tensor,
    log_var: Tensor,
}

/// The precision-weighted merge of two Gaussian estimates of one variable:
/// `σ² = 1/(σ₁⁻² + σ₂⁻²)`, `μ = (μ₁σ₁⁻² + μ₂σ₂⁻²)σ²` (per element).
pub fn precision_merge(
    mu_a: &Tensor,
    log_var_a: &Tensor,
    mu_b: &Tensor,
    log_var_b: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let prec_a = log_var_a.neg()?.exp()?;
    let prec_b = log_var_b.neg()?.exp()?;
    let prec = (&prec_a + &prec_b)?;
    let log_var = prec.log()?.neg()?;
    let mu = ((mu_a * &prec_a)? + (mu_b * &prec_b)?)?.div(&prec)?;
    Ok((mu, log_var))
}

/// `KL(N(μ_q, σ²_q) ‖ N(μ_p, σ²_p))` per element.
pub fn gaussian_kl_between(
    mu_q: &Tensor,
    log_var_q: &Tensor,
    mu_p: &Tensor,
    log_var_p: &Tensor,
) -> Result<Tensor> {
    let prec_p = log_var_p.neg()?.exp()?;
    let spread = (log_var_q.exp()? + (mu_q - mu_p)?.sqr()?)?;
    let ratio = ((spread * prec_p)? - 1.0)?;
    Ok((((log_var_p - log_var_q)? + ratio)? * 0.5)?)
}

/// One top-down pass: the decoder's output, each layer's analytic KL (B, d_i) and, when asked,
/// each row's `Σ_i log q(z_i|·) − log p(z_i|·)` of the drawn latents (B,); the posterior of
/// each layer (bottom first).
struct Pass {
    out: Tensor,
    kl: Vec<Tensor>,
    log_ratio: Option<Tensor>,
    posteriors: Vec<Gaussian>,
}

/// A deterministic block: dense layers, batch-normalised or not.
enum Block {
    Plain(Mlp),
    Normed(NormedMlp),
}

impl Block {
    /// Applies the block; a plain block's last layer is activated if `activate_last` (a
    /// normalised block's was decided when it was built).
    fn forward(&self, x: &Tensor, activate_last: bool, norming: &Norming) -> Result<Tensor> {
        match self {
            Block::Plain(m) => m.forward(x, activate_last),
            Block::Normed(m) => m.forward(x, norming),
        }
    }

    fn norms(&self) -> &[BatchNorm] {
        match self {
            Block::Plain(_) => &[],
            Block::Normed(m) => m.norms(),
        }
    }
}

/// The convolutional ends of a ladder over images: a stride-2 convolutional stack before the
/// first bottom-up block, and its mirror (transposed convolutions) after the decoder's block.
struct ConvEnds {
    encoder: ConvEncoder,
    decoder: ConvDecoder,
    /// Channels and side of the images.
    shape: (usize, usize),
}

/// The ladder VAE.
pub struct Ladder {
    /// The convolutional ends (`model.architecture = "conv"`).
    conv: Option<ConvEnds>,
    params: Params,
    /// Running moments of the batch norms (empty without them).
    buffers: Buffers,
    /// The batch norms and their rounds of batch statistics, when on.
    norms: Option<Norms>,
    spec: ModelSpec,
    /// Latent sizes, bottom first (the top is `spec.latent_dim`).
    dims: Vec<usize>,
    up: Vec<Block>,
    up_mu: Vec<Linear>,
    up_log_var: Vec<Linear>,
    /// Layer i's prior given z_{i+1}, for i below the top.
    down: Vec<Block>,
    down_mu: Vec<Linear>,
    down_log_var: Vec<Linear>,
    decoder: Block,
    likelihood: Likelihood,
    dim: usize,
}

impl Ladder {
    /// Builds a ladder VAE with parameters drawn from `seed`.
    pub fn new(spec: ModelSpec, config: &LadderConfig, device: &Device, seed: u64) -> Result<Self> {
        config
            .validate()
            .map_err(|e| ModelError::Spec(format!("[model.ladder] {e}")))?;
        spec.objective.validate()?;
        let image = match (spec.architecture, &spec.input_shape[..]) {
            (Architecture::Mlp, _) => None,
            (Architecture::Conv, [c, h, w]) if h == w => Some((*c, *h)),
            (Architecture::Conv, [h, w]) if h == w => Some((1, *h)),
            (Architecture::Conv, shape) => {
                return Err(ModelError::Spec(format!(
                    "a convolutional ladder (model.architecture = \"conv\") needs square \
                     images (C, S, S), not {shape:?}"
                )))
            }
        };
        let dim: usize = spec.input_shape.iter().product();
        if dim == 0 || spec.latent_dim == 0 {
            return Err(ModelError::Spec(format!(
                "input shape {:?} and model.latent_dim {} (the top layer) must be positive",
                spec.input_shape, spec.latent_dim
            )));
        }
        if !(spec.log_var_clamp.is_finite() && spec.log_var_clamp > 0.0) {
            return Err(ModelError::Spec(format!(
                "log-variance clamp {} must be positive",
                spec.log_var_clamp
            )));
        }
        let mut dims: Vec<usize> = config.latent_dims.iter().map(|d| *d as usize).collect();
        dims.push(spec.latent_dim);
        let hidden: Vec<usize> = config.hidden.iter().map(|h| *h as usize).collect();
        let depth = config.depth as usize;
        let act = spec.activation;
        let mut p = Params::new(device, seed);
        let mut buffers = Buffers::new(device);
        let conv = match image {
            None => None,
            Some((c, side)) => {
                let encoder = ConvEncoder::new(&mut p, "up0.conv", c, side, act)?;
                let (decoder, features) = ConvDecoder::new(&mut p, "decoder.conv", c, side, act)?;
                Some((
                    ConvEnds {
                        encoder,
                        decoder,
                        shape: (c, side),
                    },
                    features,
                ))
            }
        };
        let (wn, bn) = (config.weight_norm, config.batch_norm);
        let l = dims.len();
        // Blocks in the order the forward pass reaches them: up 0..L, down L−2..0, decoder;
        // `slot` is the first batch-norm slot of the block (depth norms each).
        let mut block = |p: &mut Params, name: &str, sizes: &[usize], last: bool, slot: usize| {
            Ok::<_, ModelError>(if bn {
                Block::Normed(NormedMlp::new(
                    p,
                    &mut buffers,
                    name,
                    sizes,
                    act,
                    last,
                    slot * depth,
                )?)
            } else if wn {
                Block::Plain(Mlp::weight_normed(p, name, sizes, act)?)
            } else {
                Block::Plain(Mlp::new(p, name, sizes, act)?)
            })
        };
        let dense = |p: &mut Params, name: &str, inputs: usize, outputs: usize| {
            if wn {
                linear_weight_normed(p, name, inputs, outputs)
            } else {
                linear(p, name, inputs, outputs)
            }
        };
        let (mut up, mut up_mu, mut up_log_var) = (Vec::new(), Vec::new(), Vec::new());
        let mut below = conv.as_ref().map_or(dim, |(c, _)| c.encoder.features);
        for (i, (&h, &d)) in hidden.iter().zip(&dims).enumerate() {
            let mut sizes = vec![below];
            sizes.extend(std::iter::repeat_n(h, depth));
            up.push(block(&mut p, &format!("up{i}"), &sizes, true, i)?);
            up_mu.push(dense(&mut p, &format!("up{i}.mu"), h, d)?);
            up_log_var.push(dense(&mut p, &format!("up{i}.log_var"), h, d)?);
            below = h;
        }
        let (mut down, mut down_mu, mut down_log_var) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..dims.len() - 1 {
            let h = hidden[i];
            let mut sizes = vec![dims[i + 1]];
            sizes.extend(std::iter::repeat_n(h, depth));
            down.push(block(
                &mut p,
                &format!("down{i}"),
                &sizes,
                true,
                2 * l - 2 - i,
            )?);
            down_mu.push(dense(&mut p, &format!("down{i}.mu"), h, dims[i])?);
            down_log_var.push(dense(&mut p, &format!("down{i}.log_var"), h, dims[i])?);
        }
        // Over images the decoder's block ends activated in the transposed convolutions'
        // input; otherwise in the logits.
        let mut dec = vec![dims[0]];
        dec.extend(std::iter::repeat_n(hidden[0], depth));
        dec.push(conv.as_ref().map_or(dim, |(_, features)| *features));
        let decoder = block(&mut p, "decoder", &dec, conv.is_some(), 2 * l - 1)?;
        let likelihood = Likelihood::new(&mut p, spec.likelihood, dim, spec.variance)?;
        let norms = if bn {
            let layers = up
                .iter()
                .chain(&down)
                .chain(std::iter::once(&decoder))
                .flat_map(|b| b.norms().iter().cloned())
                .collect();
            Some(Norms::new(
                layers,
                spec.objective.batch_rounds(dims.iter().sum()),
            )?)
        } else {
            None
        };
        Ok(Ladder {
            conv: conv.map(|(c, _)| c),
            params: p,
            buffers,
            norms,
            spec,
            dims,
            up,
            up_mu,
            up_log_var,
            down,
            down_mu,
            down_log_var,
            decoder,
            likelihood,
            dim,
        })
    }

    /// Latent sizes, bottom first.
    pub fn latent_dims(&self) -> &[usize] {
        &self.dims
    }

    fn total(&self) -> usize {
        self.dims.iter().sum()
    }

    fn clamp(&self, t: Tensor) -> Result<Tensor> {
        let c = self.spec.log_var_clamp;
        Ok(t.clamp(-c, c)?)
    }

    /// The bottom-up estimates of every layer, bottom first.
    fn bottom_up(&self, x: &Tensor, norming: &Norming) -> Result<Vec<Gaussian>> {
        match x.dims() {
            [_, d] if *d == self.dim => {}
            dims => {
                return Err(ModelError::Input(format!(
                    "examples of shape {dims:?}, expected (batch, {})",
                    self.dim
                )))
            }
        }
        let mut h = match &self.conv {
            None => x.clone(),
            Some(c) => {
                let (channels, side) = c.shape;
                c.encoder
                    .forward(&x.reshape((x.dim(0)?, channels, side, side))?)?
            }
        };
        let mut out = Vec::with_capacity(self.dims.len());
        for i in 0..self.dims.len() {
            h = self.up[i].forward(&h, true, norming)?;
            out.push(self.head(&self.up_mu[i], &self.up_log_var[i], &h, "up", norming)?);
        }
        Ok(out)
    }

    /// The Gaussian of heads `mu` and `log_var` over a block's output `h` (named `name` among
    /// what is computed from it), computed once a step where batch norm keeps `h`.
    fn head(
        &self,
        mu: &Linear,
        log_var: &Linear,
        h: &Tensor,
        name: &'static str,
        norming: &Norming,
    ) -> Result<Gaussian> {
        let [mu, log_var] = norming.reuse(h, name, || {
            Ok([mu.forward(h)?, self.clamp(log_var.forward(h)?)?])
        })?;
        Ok(Gaussian { mu, log_var })
    }

    /// The decoder's output (logits or means) for bottom latents `z`: (N, D).
    fn decode(&self, z: &Tensor, norming: &Norming) -> Result<Tensor> {
        match &self.conv {
            None => self.decoder.forward(z, false, norming),
            Some(c) => {
                let h = self.decoder.forward(z, true, norming)?;
                Ok(c.decoder.forward(&h)?.flatten_from(1)?)
            }
        }
    }

    /// The prior of layer `i` given `z_{i+1}`.
    fn prior(&self, i: usize, parent: &Tensor, norming: &Norming) -> Result<Gaussian> {
        let t = self.down[i].forward(parent, true, norming)?;
        self.head(
            &self.down_mu[i],
            &self.down_log_var[i],
            &t,
            "prior",
            norming,
        )
    }

    /// The top-down pass over bottom-up estimates `ups` with noise `eps` (rows, Σd; layers
    /// bottom first; zeros for the posterior means).
    fn top_down(
        &self,
        ups: &[Gaussian],
        eps: &Tensor,
        log_ratio: bool,
        norming: &Norming,
    ) -> Result<Pass> {
        let l = self.dims.len();
        let offsets: Vec<usize> = self
            .dims
            .iter()
            .scan(0, |at, d| {
                let o = *at;
                *at += d;
                Some(o)
            })
            .collect();
        let mut kl = vec![None; l];
        let mut posteriors = vec![None; l];
        let mut ratio: Option<Tensor> = None;
        let mut z: Option<Tensor> = None;
        for i in (0..l).rev() {
            let e = eps.narrow(1, offsets[i], self.dims[i])?;
            let (q, p) = match &z {
                None => (ups[i].clone(), None),
                Some(parent) => {
                    let p = self.prior(i, parent, norming)?;
                    let (mu, log_var) =
                        precision_merge(&ups[i].mu, &ups[i].log_var, &p.mu, &p.log_var)?;
                    (Gaussian { mu, log_var }, Some(p))
                }
            };
            let sample = (&q.mu + (q.log_var.affine(0.5, 0.0)?.exp()? * &e)?)?;
            kl[i] = Some(match &p {
                None => gaussian_kl(&q.mu, &q.log_var)?,
                Some(p) => gaussian_kl_between(&q.mu, &q.log_var, &p.mu, &p.log_var)?,
            });
            if log_ratio {
                // log q(z) − log p(z), the log 2π terms cancelling.
                let log_q = (q.log_var.clone() + e.sqr()?)?;
                let log_p = match &p {
                    None => sample.sqr()?,
                    Some(p) => {
                        (p.log_var.clone()
                            + ((&sample - &p.mu)?.sqr()? * p.log_var.neg()?.exp()?)?)?
                    }
                };
                let r = ((log_p - log_q)? * 0.5)?.sum(D::Minus1)?;
                ratio = Some(match ratio {
                    None => r,
                    Some(acc) => (acc + r)?,
                });
            }
            posteriors[i] = Some(q);
            z = Some(sample);
        }
        let out = self.decode(&z.expect("at least two layers"), norming)?;
        Ok(Pass {
            out,
            kl: kl.into_iter().map(|k| k.expect("every layer")).collect(),
            log_ratio: ratio,
            posteriors: posteriors
                .into_iter()
                .map(|q| q.expect("every layer"))
                .collect(),
        })
    }

    /// The reconstruction NLL (B,), the per-dimension KL of every layer (B, Σd) and each
    /// layer's KL, for one posterior sample per row of the stream (purpose, counter).
    fn terms(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        (purpose, counter): (Purpose, u64),
        norming: &Norming,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let ups = self.bottom_up(input.x, norming)?;
        let eps = noise.rows(purpose, counter, input.ids, self.total(), input.x.device())?;
        let pass = self.top_down(&ups, &eps, false, norming)?;
        let rec = self.likelihood.nll(&pass.out, input.x)?;
        let kl_dims = Tensor::cat(&pass.kl, 1)?;
        Ok((rec, kl_dims, pass.kl))
    }

    /// The objective of this rank's rows with the global sums `own` of the objective's own
    /// batch statistics (free bits), and the KL of each layer as a term.
    fn objective(
        &self,
        input: &Input<'_>,
        ctx: &StepContext<'_>,
        own: &[f32],
        norming: &Norming,
    ) -> Result<LossOutput> {
        let train = (Purpose::Train, ctx.step);
        let (rec, kl_dims, layers) = self.terms(input, ctx.noise, train, norming)?;
        let ctx = StepContext {
            batch_stats: own,
            ..*ctx
        };
        let mut out = vae_loss(&rec, &kl_dims, &self.spec.objective, &ctx)?;
        for (name, kl) in KL_LAYERS.iter().zip(&layers) {
            out.terms
                .insert(name, Term::per_row(&kl.sum(D::Minus1)?.detach())?);
        }
        Ok(out)
    }

    /// Importance log-weights of samples `samples`: (S, B).
    fn log_weights(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        samples: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let b = input.ids.len();
        let s = samples.len();
        let norming = Norming::eval();
        let ups = self.bottom_up(input.x, &norming)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let d = t.dim(1)?;
            Ok(t.unsqueeze(0)?
                .broadcast_as((s, b, d))?
                .reshape((s * b, d))?)
        };
        let ups = ups
            .iter()
            .map(|g| {
                Ok(Gaussian {
                    mu: repeat(&g.mu)?,
                    log_var: repeat(&g.log_var)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let eps: Vec<Tensor> = samples
            .map(|j| {
                noise.rows(
                    Purpose::Eval,
                    j as u64,
                    input.ids,
                    self.total(),
                    input.x.device(),
                )
            })
            .collect::<Result<_>>()?;
        let eps = Tensor::cat(&eps, 0)?;
        let pass = self.top_down(&ups, &eps, true, &norming)?;
        let x = repeat(input.x)?;
        let log_px = self.likelihood.nll(&pass.out, &x)?.neg()?;
        let ratio = pass.log_ratio.expect("asked for");
        Ok((log_px - ratio)?.reshape((s, b))?)
    }

    /// The posterior means of every layer from a noiseless top-down pass, bottom first.
    fn means(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let norming = Norming::eval();
        let ups = self.bottom_up(x, &norming)?;
        let eps = Tensor::zeros((x.dim(0)?, self.total()), x.dtype(), x.device())?;
        Ok(self
            .top_down(&ups, &eps, false, &norming)?
            .posteriors
            .into_iter()
            .map(|q| q.mu)
            .collect())
    }

    /// Decodes `z` of layer `layer` down the prior means of the layers below: (N, D) means.
    fn decode_from(&self, layer: usize, z: &Tensor) -> Result<Tensor> {
        let norming = Norming::eval();
        let mut z = z.clone();
        for i in (0..layer).rev() {
            z = self.prior(i, &z, &norming)?.mu;
        }
        self.likelihood.mean(&self.decode(&z, &norming)?)
    }

    /// Traversals of layer `layer`'s first `max_dims` dimensions around `base` (its posterior
    /// mean for one row), `steps` values from −3 to 3 each, the layers below following their
    /// prior means: (dims × steps, D).
    fn traverse(
        &self,
        layer: usize,
        base: &[f32],
        max_dims: usize,
        steps: usize,
    ) -> Result<Tensor> {
        let (z, rows) = traversal_grid(base, max_dims, steps);
        let device = self.params.device();
        self.decode_from(layer, &Tensor::from_vec(z, (rows, base.len()), device)?)
    }
}

impl Model for Ladder {
    fn params(&self) -> &Params {
        &self.params
    }

    fn buffers(&self) -> Option<&Buffers> {
        self.norms.as_ref().map(|_| &self.buffers)
    }

    fn statistics(&self) -> Statistics {
        let mut terms = VAE_TERMS.to_vec();
        terms.extend(&KL_LAYERS[..self.dims.len()]);
        terms.sort_unstable();
        match &self.norms {
            None => Statistics {
                terms,
                batch: self.spec.objective.batch_rounds(self.total()),
                update: 0,
            },
            Some(norms) => Statistics {
                terms,
                batch: norms.rounds(),
                update: norms.update_len(),
            },
        }
    }

    fn batch_statistics(
        &self,
        input: &Input<'_>,
        ctx: &StepContext<'_>,
        round: usize,
    ) -> Result<Tensor> {
        let train = (Purpose::Train, ctx.step);
        let Some(norms) = &self.norms else {
            // Free bits' round (no layer to normalise).
            let (_, kl_dims, _) = self.terms(input, ctx.noise, train, &Norming::eval())?;
            return free_bits_statistics(&kl_dims);
        };
        let rows = ctx.global_rows;
        match norms.round(round)? {
            Round::Moments(slot) => {
                let norming = norms.training(ctx.batch_stats, rows, (ctx.step, input.x))?;
                norms.measure(&norming, slot, || {
                    self.terms(input, ctx.noise, train, &norming).map(drop)
                })
            }
            Round::Own(_) => {
                let norming = norms.training(ctx.batch_stats, rows, (ctx.step, input.x))?;
                let (_, kl_dims, _) = self.terms(input, ctx.noise, train, &norming)?;
                free_bits_statistics(&kl_dims)
            }
            Round::Gradients(slot) => norms.gradient_sums(
                &self.params,
                (ctx.step, input.x),
                ctx.batch_stats,
                rows,
                slot,
                |norming| {
                    let own = norms.own_stats(ctx.batch_stats);
                    self.objective(input, ctx, own, norming)
                },
            ),
        }
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let Some(norms) = &self.norms else {
            return self.objective(input, ctx, ctx.batch_stats, &Norming::eval());
        };
        norms.finish(
            &self.params,
            (ctx.step, input.x),
            ctx.batch_stats,
            ctx.global_rows,
            input.ids.len(),
        )
    }

    fn update_state(&mut self, stats: &[f32], _step: u64) -> Result<()> {
        match &self.norms {
            Some(norms) => norms.update_state(&self.buffers, stats),
            None => Ok(()),
        }
    }

    fn evaluator<'a>(&'a self, options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(LadderEvaluator {
            model: self,
            options,
            rows: 0,
            rec: 0.0,
            kl: vec![0.0; self.dims.len()],
            nll_iw: 0.0,
            active: vec![ActiveUnits::default(); self.dims.len()],
        }))
    }

    fn sample(
        &self,
        n: usize,
        seed: u64,
        _labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        let ids: Vec<u64> = (0..n as u64).collect();
        let eps = Noise::new(seed).rows(Purpose::Sample, 0, &ids, self.total(), device)?;
        let norming = Norming::eval();
        let l = self.dims.len();
        let top_at = self.total() - self.dims[l - 1];
        let mut z = eps.narrow(1, top_at, self.dims[l - 1])?;
        let mut at = top_at;
        for i in (0..l - 1).rev() {
            at -= self.dims[i];
            let p = self.prior(i, &z, &norming)?;
            let e = eps.narrow(1, at, self.dims[i])?;
            z = (&p.mu + (p.log_var.affine(0.5, 0.0)?.exp()? * e)?)?;
        }
        self.likelihood.mean(&self.decode(&z, &norming)?)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        let bottom = self.means(input.x)?.remove(0);
        self.likelihood
            .mean(&self.decode(&bottom, &Norming::eval())?)
    }

    /// The top layer's traversals (the layers below following their prior means).
    fn traversals(
        &self,
        input: &Input<'_>,
        max_dims: usize,
        steps: usize,
    ) -> Result<Option<Tensor>> {
        let l = self.dims.len();
        let base = self.means(input.x)?[l - 1]
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Some(self.traverse(l - 1, &base, max_dims, steps)?))
    }

    /// `traversals_layer{i}.png` for every layer: its first 8 dimensions varied around the
    /// first test row's posterior mean, the layers below following their prior means.
    fn pictures(&self, input: &Input<'_>) -> Result<Vec<Picture>> {
        let one = input.x.narrow(0, 0, 1)?;
        let means = self.means(&one)?;
        let steps = 9;
        means
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let base = m.flatten_all()?.to_vec1::<f32>()?;
                let values = self
                    .traverse(i, &base, 8, steps)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Picture {
                    name: format!("traversals_layer{}", i + 1),
                    values,
                    cols: steps,
                })
            })
            .collect()
    }
}

/// The ladder's test figures.
struct LadderEvaluator<'a> {
    model: &'a Ladder,
    options: EvalOptions<'a>,
    rows: u64,
    rec: f64,
    kl: Vec<f64>,
    nll_iw: f64,
    active: Vec<ActiveUnits>,
}

impl Evaluator for LadderEvaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        let m = self.model;
        let (rec, _, layers) = m.terms(
            input,
            self.options.noise,
            (Purpose::Train, 0),
            &Norming::eval(),
        )?;
        self.rec += f64::from(rec.sum_all()?.to_scalar::<f32>()?);
        for (acc, kl) in self.kl.iter_mut().zip(&layers) {
            *acc += f64::from(kl.sum_all()?.to_scalar::<f32>()?);
        }
        if let Some(k) = self.options.iw_samples {
            let b = input.ids.len();
            let bound = iw_bound(b, k, self.options.max_rows, |samples| {
                m.log_weights(input, self.options.noise, samples)
            })?;
            self.nll_iw -= bound.iter().sum::<f64>();
        }
        for (acc, mu) in self.active.iter_mut().zip(m.means(input.x)?) {
            acc.add(&mu)?;
        }
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let n = self.rows.max(1) as f64;
        let kl: f64 = self.kl.iter().sum();
        let active: Vec<f64> = self.active.iter().map(|a| a.count(0.01) as f64).collect();
        let mut m = Metrics::from([
            ("neg_elbo".to_string(), Metric::Value((self.rec + kl) / n)),
            ("rec".to_string(), Metric::Value(self.rec / n)),
            ("kl".to_string(), Metric::Value(kl / n)),
            (
                "kl_layers".to_string(),
                Metric::List(self.kl.iter().map(|k| k / n).collect()),
            ),
            (
                "active_units".to_string(),
                Metric::Count(active.iter().sum::<f64>() as u64),
            ),
            ("active_units_layers".to_string(), Metric::List(active)),
            (
                "latent_dim".to_string(),
                Metric::Count(self.model.total() as u64),
            ),
        ]);
        if let Some(k) = self.options.iw_samples {
            m.insert("nll_iw".into(), Metric::Value(self.nll_iw / n));
            m.insert("iw_samples".into(), Metric::Count(k as u64));
        }
        m
    }
}

impl Variant for Ladder {
    const KIND: &'static str = "ladder";
    const ABOUT: &'static str = "ladder VAE: stochastic layers merged top-down by precision, \
                                 per-layer KL, IW bound over all layers";
    type Config = LadderConfig;

    fn build(
        spec: &ModelSpec,
        config: &LadderConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Model>> {
        Ok(Box::new(Ladder::new(
            spec.clone(),
            config,
            &ctx.device,
            ctx.seed,
        )?))
    }
}
