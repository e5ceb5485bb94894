//! The VAE (and β-VAE through the objective): diagonal Gaussian posterior, MLP or
//! convolutional encoder/decoder, any likelihood — optionally conditioned on a class label
//! (the conditional VAE): the encoder's input features and the latent the decoder reads meet
//! the label as if its one-hot code were appended to them (a class embedding added after their
//! first layer's product, which is the same function without the product's K extra columns).

use std::ops::Range;

use candle_core::{Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::gaussian::reparameterise;
use crate::iwae::{iw_bound, ActiveUnits};
use crate::layers::{linear, ConvDecoder, ConvEncoder, Linear, Mlp};
use crate::likelihood::{Likelihood, LikelihoodKind};
use crate::model::{
    EvalOptions, Evaluator, Input, LabelUse, LatentModel, LossOutput, Metric, Metrics, Model,
    Statistics, StepContext,
};
use crate::noise::{Noise, Purpose};
use crate::objective::{free_bits_statistics, gaussian_kl, vae_loss, VAE_TERMS};
use crate::params::Params;
use crate::registry::{NoSection, Variant};
use crate::spec::{Architecture, BuildContext, ModelSpec};

enum Trunk {
    Mlp {
        enc: Mlp,
        dec: Mlp,
    },
    Conv {
        enc: ConvEncoder,
        enc_fc: Mlp,
        dec_fc: Mlp,
        dec: ConvDecoder,
        shape: (usize, usize),
    },
}

/// A VAE, conditioned on a class label when it has `classes`: its networks and their
/// parameters.
pub struct Vae {
    params: Params,
    net: VaeNet,
}

/// The networks of a (conditional) VAE — encoder, decoder, likelihood — whose parameters live
/// in the `Params` they were built into (a model may hold more networks there: M2's classifier).
pub struct VaeNet {
    spec: ModelSpec,
    trunk: Trunk,
    mu: Linear,
    log_var: Linear,
    likelihood: Likelihood,
    dim: usize,
    /// Classes of the label it is conditioned on (0: unconditional).
    classes: usize,
}

impl std::ops::Deref for Vae {
    type Target = VaeNet;

    fn deref(&self) -> &VaeNet {
        &self.net
    }
}

impl Vae {
    /// Builds a VAE with parameters drawn from `seed`.
    pub fn new(spec: ModelSpec, device: &Device, seed: u64) -> Result<Self> {
        Vae::conditional(spec, 0, device, seed)
    }

    /// Builds a VAE conditioned on a label of `classes` classes (0: unconditional), parameters
    /// drawn from `seed` (see [`VaeNet::new`]).
    pub fn conditional(
        spec: ModelSpec,
        classes: usize,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let mut params = Params::new(device, seed);
        let net = VaeNet::new(&mut params, spec, classes)?;
        Ok(Vae { params, net })
    }
}

impl VaeNet {
    /// The networks of a VAE conditioned on a label of `classes` classes (0: unconditional),
    /// their parameters drawn into `params`. With a label, encoder and decoder read it beside
    /// their input (a class embedding in their first dense layer): for convolutions it joins
    /// the flattened features after the convolutional stack (the equivalent of K more inputs to
    /// a dense layer instead of K constant planes convolved at every position).
    pub fn new(params: &mut Params, spec: ModelSpec, classes: usize) -> Result<Self> {
        spec.objective.validate()?;
        let dim: usize = spec.input_shape.iter().product();
        if dim == 0 || spec.latent_dim == 0 || spec.hidden.contains(&0) {
            return Err(ModelError::Spec(format!(
                "input shape {:?}, latent dim {} and hidden sizes {:?} must be positive",
                spec.input_shape, spec.latent_dim, spec.hidden
            )));
        }
        if !(spec.log_var_clamp.is_finite() && spec.log_var_clamp > 0.0) {
            return Err(ModelError::Spec(format!(
                "log-variance clamp {} must be positive",
                spec.log_var_clamp
            )));
        }
        let p = params;
        let (trunk, head_in) = match spec.architecture {
            Architecture::Mlp => {
                let mut sizes = vec![dim];
                sizes.extend(&spec.hidden);
                let enc = Mlp::conditional(p, "encoder", &sizes, classes, spec.activation)?;
                let mut dec_sizes = vec![spec.latent_dim];
                dec_sizes.extend(spec.hidden.iter().rev());
                dec_sizes.push(dim);
                let dec = Mlp::conditional(p, "decoder", &dec_sizes, classes, spec.activation)?;
                (Trunk::Mlp { enc, dec }, *sizes.last().expect("non-empty"))
            }
            Architecture::Conv => {
                let (c, s) = match spec.input_shape[..] {
                    [c, h, w] if h == w => (c, h),
                    [h, w] if h == w => (1, h),
                    _ => {
                        return Err(ModelError::Spec(format!(
                            "a convolutional VAE needs square images (C, S, S), not {:?}",
                            spec.input_shape
                        )))
                    }
                };
                let enc = ConvEncoder::new(p, "encoder", c, s, spec.activation)?;
                let mut fc = vec![enc.features];
                fc.extend(&spec.hidden);
                let enc_fc = Mlp::conditional(p, "encoder.fc", &fc, classes, spec.activation)?;
                let (dec, features) = ConvDecoder::new(p, "decoder", c, s, spec.activation)?;
                let mut dfc = vec![spec.latent_dim];
                dfc.extend(spec.hidden.iter().rev());
                dfc.push(features);
                let dec_fc = Mlp::conditional(p, "decoder.fc", &dfc, classes, spec.activation)?;
                let head_in = *fc.last().expect("non-empty");
                (
                    Trunk::Conv {
                        enc,
                        enc_fc,
                        dec_fc,
                        dec,
                        shape: (c, s),
                    },
                    head_in,
                )
            }
        };
        let mu = linear(p, "posterior.mu", head_in, spec.latent_dim)?;
        let log_var = linear(p, "posterior.log_var", head_in, spec.latent_dim)?;
        let likelihood = Likelihood::new(p, spec.likelihood, dim, spec.variance)?;
        Ok(VaeNet {
            spec,
            trunk,
            mu,
            log_var,
            likelihood,
            dim,
            classes,
        })
    }

    /// The specification.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The likelihood.
    pub fn likelihood(&self) -> &Likelihood {
        &self.likelihood
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, d] if *d == self.dim => Ok(()),
            dims => Err(ModelError::Input(format!(
                "examples of shape {dims:?}, expected (batch, {})",
                self.dim
            ))),
        }
    }

    /// The classes (B,) (u32) of the labels a conditional VAE reads (`None` when it is
    /// unconditional); a missing or out-of-range label is an error naming the row.
    pub fn condition(
        &self,
        labels: &[Option<i64>],
        ids: &[u64],
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if self.classes == 0 {
            return Ok(None);
        }
        let k = self.classes;
        let mut classes = Vec::with_capacity(labels.len());
        for (label, id) in labels.iter().zip(ids) {
            match label {
                Some(y) if (0..k as i64).contains(y) => classes.push(*y as u32),
                Some(y) => {
                    return Err(ModelError::Input(format!(
                        "row {id} has label {y}, but the model has {k} classes (0 to {})",
                        k - 1
                    )))
                }
                None => {
                    return Err(ModelError::Input(format!(
                        "row {id} has no label: a conditional VAE needs a label on every row"
                    )))
                }
            }
        }
        Ok(Some(Tensor::from_vec(classes, labels.len(), device)?))
    }

    /// q(z|x[, y]): (μ, log σ²), each (B, d); `y` the classes of a conditional VAE (u32, (B,)).
    pub fn encode(&self, x: &Tensor, y: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        self.encode_rows(x, None, y)
    }

    /// [`VaeNet::encode`] of rows that each read row `rows[i]` of `x` (with class `y[i]`): the
    /// networks before the label meets the features run once per row of `x`.
    fn encode_rows(
        &self,
        x: &Tensor,
        rows: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        self.check(x)?;
        let h = match &self.trunk {
            Trunk::Mlp { enc, .. } => enc.forward_rows(x, rows, y, true)?,
            Trunk::Conv {
                enc,
                enc_fc,
                shape: (c, s),
                ..
            } => {
                let h = enc.forward(&x.reshape((x.dim(0)?, *c, *s, *s))?)?;
                enc_fc.forward_rows(&h, rows, y, true)?
            }
        };
        let clamp = self.spec.log_var_clamp;
        Ok((
            self.mu.forward(&h)?,
            self.log_var.forward(&h)?.clamp(-clamp, clamp)?,
        ))
    }

    /// The decoder's output (logits or means) for latents (N, d) [and classes (N,)]: (N, D).
    pub fn decode(&self, z: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        Ok(match &self.trunk {
            Trunk::Mlp { dec, .. } => dec.forward_rows(z, None, y, false)?,
            Trunk::Conv { dec_fc, dec, .. } => {
                let h = dec_fc.forward_rows(z, None, y, true)?;
                dec.forward(&h)?.flatten_from(1)?
            }
        })
    }
}

impl VaeNet {
    /// Importance log-weights `log p(x, z_s) − log q(z_s | x)` for samples `samples`: (S, B).
    pub fn log_weights(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        samples: Range<usize>,
    ) -> Result<Tensor> {
        let y = self.condition(input.labels, input.ids, input.x.device())?;
        let (mu, log_var) = self.encode(input.x, y.as_ref())?;
        let (b, d) = mu.dims2()?;
        let s = samples.len();
        let eps: Vec<Tensor> = samples
            .map(|j| noise.rows(Purpose::Eval, j as u64, input.ids, d, input.x.device()))
            .collect::<Result<_>>()?;
        let eps = Tensor::stack(&eps, 0)?; // (S, B, d)
        let std = log_var.affine(0.5, 0.0)?.exp()?;
        let z = eps.broadcast_mul(&std)?.broadcast_add(&mu)?; // (S, B, d)
        let ys = match &y {
            Some(y) => Some(y.unsqueeze(0)?.broadcast_as((s, b))?.reshape(s * b)?),
            None => None,
        };
        let out = self.decode(&z.reshape((s * b, d))?, ys.as_ref())?;
        let x = input
            .x
            .unsqueeze(0)?
            .broadcast_as((s, b, self.dim))?
            .reshape((s * b, self.dim))?;
        let log_px = self.likelihood.nll(&out, &x)?.neg()?.reshape((s, b))?;
        // log p(z) − log q(z|x) = −½Σz² + ½Σ(ε² + log σ²)   (the log 2π terms cancel)
        let log_pz = (z.sqr()?.sum(D::Minus1)? * -0.5)?;
        let log_qz = ((eps
            .sqr()?
            .sum(D::Minus1)?
            .broadcast_add(&log_var.sum(D::Minus1)?.unsqueeze(0)?))?
            * -0.5)?;
        Ok(((log_px + log_pz)? - log_qz)?)
    }

    /// The mean of p(x|z[, y]) for latents `z` (N, latent_dim): (N, D).
    pub fn decode_mean(&self, z: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        self.likelihood.mean(&self.decode(z, y)?)
    }

    /// The per-example reconstruction NLL (B,) and per-dimension KL (B, d) of one posterior
    /// sample per row, drawn from the stream of (purpose, counter).
    pub(crate) fn terms(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        purpose: Purpose,
        counter: u64,
    ) -> Result<(Tensor, Tensor)> {
        self.terms_rows(input.x, None, input, noise, purpose, counter)
    }

    /// [`VaeNet::terms`] of `input`'s rows when row `i` of `input.x` is row `rows[i]` of
    /// `source` (u32 indices): the encoder reads `source`, so rows read many times (under
    /// different labels) pass the layers before the label once.
    pub(crate) fn terms_rows(
        &self,
        source: &Tensor,
        rows: Option<&Tensor>,
        input: &Input<'_>,
        noise: &Noise,
        purpose: Purpose,
        counter: u64,
    ) -> Result<(Tensor, Tensor)> {
        let y = self.condition(input.labels, input.ids, input.x.device())?;
        let (mu, log_var) = self.encode_rows(source, rows, y.as_ref())?;
        let eps = noise.rows(
            purpose,
            counter,
            input.ids,
            self.spec.latent_dim,
            input.x.device(),
        )?;
        let z = reparameterise(&mu, &log_var, &eps)?;
        let fused = match (&self.trunk, self.spec.likelihood) {
            (Trunk::Mlp { dec, .. }, LikelihoodKind::Bernoulli) => {
                dec.bernoulli_nll(&z, y.as_ref(), input.x)?
            }
            _ => None,
        };
        let rec = match fused {
            Some(rec) => rec,
            None => self
                .likelihood
                .nll(&self.decode(&z, y.as_ref())?, input.x)?,
        };
        Ok((rec, gaussian_kl(&mu, &log_var)?))
    }
}

impl VaeNet {
    /// `n` samples of p(x|z[, y]) (as means) for z drawn from the prior with `seed`; a
    /// conditional VAE needs one label per sample.
    pub fn sample(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        let ids: Vec<u64> = (0..n as u64).collect();
        let z = Noise::new(seed).rows(Purpose::Sample, 0, &ids, self.spec.latent_dim, device)?;
        let y = match (self.classes, labels) {
            (0, _) => None,
            (_, Some(labels)) if labels.len() == n => {
                let labels: Vec<Option<i64>> = labels.iter().map(|l| Some(*l)).collect();
                self.condition(&labels, &ids, device)?
            }
            (_, labels) => {
                return Err(ModelError::Input(format!(
                    "a conditional VAE samples given one label per sample: {n} samples, {} labels",
                    labels.map_or(0, <[i64]>::len)
                )))
            }
        };
        self.decode_mean(&z, y.as_ref())
    }

    /// Reconstructions through the posterior mean (of the rows' labels, if conditional).
    pub fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        let y = self.condition(input.labels, input.ids, input.x.device())?;
        self.decode_mean(&self.encode(input.x, y.as_ref())?.0, y.as_ref())
    }

    /// Traversals of the first `max_dims` latent dimensions around one row's posterior mean,
    /// `steps` values from −3 to 3 each: (dims × steps, D).
    pub fn traversals(&self, input: &Input<'_>, max_dims: usize, steps: usize) -> Result<Tensor> {
        let y = self.condition(input.labels, input.ids, input.x.device())?;
        let base = self
            .encode(input.x, y.as_ref())?
            .0
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (z, rows) = traversal_grid(&base, max_dims, steps);
        let z = Tensor::from_vec(z, (rows, base.len()), input.x.device())?;
        let ys = match &y {
            Some(y) => Some(y.broadcast_as(rows)?.contiguous()?),
            None => None,
        };
        self.decode_mean(&z, ys.as_ref())
    }
}

/// Latent points around `base`: each of its first `max_dims` dimensions set in turn to `steps`
/// values from −3 to 3, the others kept; returns the points (row-major) and their count.
pub(crate) fn traversal_grid(base: &[f32], max_dims: usize, steps: usize) -> (Vec<f32>, usize) {
    let dims = base.len().min(max_dims);
    let mut z = Vec::with_capacity(dims * steps * base.len());
    for dim in 0..dims {
        for s in 0..steps {
            let mut v = base.to_vec();
            v[dim] = -3.0 + 6.0 * s as f32 / (steps - 1).max(1) as f32;
            z.extend(v);
        }
    }
    (z, dims * steps)
}

impl Model for Vae {
    fn params(&self) -> &Params {
        &self.params
    }

    fn statistics(&self) -> Statistics {
        Statistics {
            terms: VAE_TERMS.to_vec(),
            batch: self.spec.objective.batch_rounds(self.spec.latent_dim),
            update: 0,
        }
    }

    fn labels(&self) -> LabelUse {
        match self.classes {
            0 => LabelUse::Ignored,
            classes => LabelUse::Every { classes },
        }
    }

    fn batch_statistics(&self, input: &Input<'_>, _: &StepContext<'_>, _: usize) -> Result<Tensor> {
        let y = self.condition(input.labels, input.ids, input.x.device())?;
        let (mu, log_var) = self.encode(input.x, y.as_ref())?;
        free_bits_statistics(&gaussian_kl(&mu.detach(), &log_var.detach())?)
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let (rec, kl_dims) = self.terms(input, ctx.noise, Purpose::Train, ctx.step)?;
        vae_loss(&rec, &kl_dims, &self.spec.objective, ctx)
    }

    fn evaluator<'a>(&'a self, options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(VaeEvaluator {
            vae: self,
            options,
            rows: 0,
            rec: 0.0,
            kl: 0.0,
            nll_iw: 0.0,
            active: ActiveUnits::default(),
        }))
    }

    fn sample(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        self.net.sample(n, seed, labels, device)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        self.net.reconstruct(input)
    }

    fn traversals(
        &self,
        input: &Input<'_>,
        max_dims: usize,
        steps: usize,
    ) -> Result<Option<Tensor>> {
        Ok(Some(self.net.traversals(input, max_dims, steps)?))
    }

    /// An unconditional VAE's encoder and decoder (a conditional one's need a label).
    fn latent(&self) -> Option<&dyn LatentModel> {
        (self.classes == 0).then_some(&self.net as &dyn LatentModel)
    }
}

impl LatentModel for VaeNet {
    fn latent_dim(&self) -> usize {
        self.spec.latent_dim
    }

    fn example_len(&self) -> usize {
        self.dim
    }

    fn encode_latent(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode(x, None)
    }

    fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_mean(z, None)
    }
}

/// The VAE's test figures: single-sample −ELBO and its terms, the IW bound, active units.
struct VaeEvaluator<'a> {
    vae: &'a Vae,
    options: EvalOptions<'a>,
    rows: u64,
    rec: f64,
    kl: f64,
    nll_iw: f64,
    active: ActiveUnits,
}

impl Evaluator for VaeEvaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        let (rec, kl_dims) = self
            .vae
            .terms(input, self.options.noise, Purpose::Train, 0)?;
        self.rec += f64::from(rec.sum_all()?.to_scalar::<f32>()?);
        self.kl += f64::from(kl_dims.sum_all()?.to_scalar::<f32>()?);
        if let Some(k) = self.options.iw_samples {
            let b = input.ids.len();
            let bound = iw_bound(b, k, self.options.max_rows, |samples| {
                self.vae.log_weights(input, self.options.noise, samples)
            })?;
            self.nll_iw -= bound.iter().sum::<f64>();
        }
        let y = self
            .vae
            .condition(input.labels, input.ids, input.x.device())?;
        self.active.add(&self.vae.encode(input.x, y.as_ref())?.0)?;
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let n = self.rows.max(1) as f64;
        let mut m = Metrics::from([
            (
                "neg_elbo".to_string(),
                Metric::Value((self.rec + self.kl) / n),
            ),
            ("rec".to_string(), Metric::Value(self.rec / n)),
            ("kl".to_string(), Metric::Value(self.kl / n)),
            (
                "active_units".to_string(),
                Metric::Count(self.active.count(0.01) as u64),
            ),
            (
                "latent_dim".to_string(),
                Metric::Count(self.vae.spec.latent_dim as u64),
            ),
        ]);
        if let Some(k) = self.options.iw_samples {
            m.insert("nll_iw".into(), Metric::Value(self.nll_iw / n));
            m.insert("iw_samples".into(), Metric::Count(k as u64));
        }
        m
    }
}

impl Variant for Vae {
    const KIND: &'static str = "vae";
    const ABOUT: &'static str =
        "VAE: diagonal Gaussian posterior, analytic KL, β / KL warm-up / free bits from [model]";
    type Config = NoSection;

    fn build(spec: &ModelSpec, _: &NoSection, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        Ok(Box::new(Vae::new(spec.clone(), &ctx.device, ctx.seed)?))
    }
}

/// The β-VAE: the VAE under the name papers use for it, meant with `model.beta` ≠ 1.
pub struct BetaVae;

impl Variant for BetaVae {
    const KIND: &'static str = "beta_vae";
    const ABOUT: &'static str = "β-VAE: the VAE with model.beta weighting the KL term";
    type Config = NoSection;

    fn build(spec: &ModelSpec, section: &NoSection, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        Vae::build(spec, section, ctx)
    }
}
