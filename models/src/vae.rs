//! The VAE (and β-VAE through the objective): diagonal Gaussian posterior, MLP or
//! convolutional encoder/decoder, any likelihood.

use std::ops::Range;

use candle_core::{Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::gaussian::reparameterise;
use crate::iwae::{iw_bound, ActiveUnits};
use crate::layers::{linear, ConvDecoder, ConvEncoder, Linear, Mlp};
use crate::likelihood::Likelihood;
use crate::model::{
    EvalOptions, Evaluator, Input, LossOutput, Metric, Metrics, Model, Statistics, StepContext,
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

/// A VAE.
pub struct Vae {
    spec: ModelSpec,
    params: Params,
    trunk: Trunk,
    mu: Linear,
    log_var: Linear,
    likelihood: Likelihood,
    dim: usize,
}

impl Vae {
    /// Builds a VAE with parameters drawn from `seed`.
    pub fn new(spec: ModelSpec, device: &Device, seed: u64) -> Result<Self> {
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
        let mut params = Params::new(device, seed);
        let p = &mut params;
        let (trunk, head_in) = match spec.architecture {
            Architecture::Mlp => {
                let mut sizes = vec![dim];
                sizes.extend(&spec.hidden);
                let enc = Mlp::new(p, "encoder", &sizes, spec.activation)?;
                let mut dec_sizes = vec![spec.latent_dim];
                dec_sizes.extend(spec.hidden.iter().rev());
                dec_sizes.push(dim);
                let dec = Mlp::new(p, "decoder", &dec_sizes, spec.activation)?;
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
                let enc_fc = Mlp::new(p, "encoder.fc", &fc, spec.activation)?;
                let (dec, features) = ConvDecoder::new(p, "decoder", c, s, spec.activation)?;
                let mut dfc = vec![spec.latent_dim];
                dfc.extend(spec.hidden.iter().rev());
                dfc.push(features);
                let dec_fc = Mlp::new(p, "decoder.fc", &dfc, spec.activation)?;
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
        Ok(Vae {
            spec,
            params,
            trunk,
            mu,
            log_var,
            likelihood,
            dim,
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

    /// q(z|x): (μ, log σ²), each (B, d).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check(x)?;
        let h = match &self.trunk {
            Trunk::Mlp { enc, .. } => enc.forward(x, true)?,
            Trunk::Conv {
                enc,
                enc_fc,
                shape: (c, s),
                ..
            } => {
                let h = enc.forward(&x.reshape((x.dim(0)?, *c, *s, *s))?)?;
                enc_fc.forward(&h, true)?
            }
        };
        let clamp = self.spec.log_var_clamp;
        Ok((
            self.mu.forward(&h)?,
            self.log_var.forward(&h)?.clamp(-clamp, clamp)?,
        ))
    }

    /// The decoder's output (logits or means) for latents (N, d): (N, D).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(match &self.trunk {
            Trunk::Mlp { dec, .. } => dec.forward(z, false)?,
            Trunk::Conv { dec_fc, dec, .. } => {
                let h = dec_fc.forward(z, true)?;
                dec.forward(&h)?.flatten_from(1)?
            }
        })
    }
}

impl Vae {
    /// Importance log-weights `log p(x, z_s) − log q(z_s | x)` for samples `samples`: (S, B).
    pub fn log_weights(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        samples: Range<usize>,
    ) -> Result<Tensor> {
        let (mu, log_var) = self.encode(input.x)?;
        let (b, d) = mu.dims2()?;
        let s = samples.len();
        let eps: Vec<Tensor> = samples
            .map(|j| noise.rows(Purpose::Eval, j as u64, input.ids, d, input.x.device()))
            .collect::<Result<_>>()?;
        let eps = Tensor::stack(&eps, 0)?; // (S, B, d)
        let std = log_var.affine(0.5, 0.0)?.exp()?;
        let z = eps.broadcast_mul(&std)?.broadcast_add(&mu)?; // (S, B, d)
        let out = self.decode(&z.reshape((s * b, d))?)?;
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

    /// The mean of p(x|z) for latents `z` (N, latent_dim): (N, D).
    pub fn decode_mean(&self, z: &Tensor) -> Result<Tensor> {
        self.likelihood.mean(&self.decode(z)?)
    }

    /// The per-example reconstruction NLL (B,) and per-dimension KL (B, d) of one posterior
    /// sample per row, drawn from the stream of (purpose, counter).
    fn terms(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        purpose: Purpose,
        counter: u64,
    ) -> Result<(Tensor, Tensor)> {
        let (mu, log_var) = self.encode(input.x)?;
        let eps = noise.rows(
            purpose,
            counter,
            input.ids,
            self.spec.latent_dim,
            input.x.device(),
        )?;
        let z = reparameterise(&mu, &log_var, &eps)?;
        let rec = self.likelihood.nll(&self.decode(&z)?, input.x)?;
        Ok((rec, gaussian_kl(&mu, &log_var)?))
    }
}

impl Model for Vae {
    fn params(&self) -> &Params {
        &self.params
    }

    fn statistics(&self) -> Statistics {
        Statistics {
            terms: VAE_TERMS.to_vec(),
            batch: self
                .spec
                .objective
                .batch_statistics_len(self.spec.latent_dim),
            update: 0,
        }
    }

    fn batch_statistics(&self, input: &Input<'_>, _ctx: &StepContext<'_>) -> Result<Tensor> {
        let (mu, log_var) = self.encode(input.x)?;
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
        _labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        let ids: Vec<u64> = (0..n as u64).collect();
        let z = Noise::new(seed).rows(Purpose::Sample, 0, &ids, self.spec.latent_dim, device)?;
        self.decode_mean(&z)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        self.decode_mean(&self.encode(input.x)?.0)
    }

    fn traversals(
        &self,
        input: &Input<'_>,
        max_dims: usize,
        steps: usize,
    ) -> Result<Option<Tensor>> {
        let base = self.encode(input.x)?.0.flatten_all()?.to_vec1::<f32>()?;
        let d = base.len();
        let dims = d.min(max_dims);
        let mut z = Vec::with_capacity(dims * steps * d);
        for dim in 0..dims {
            for s in 0..steps {
                let mut v = base.clone();
                v[dim] = -3.0 + 6.0 * s as f32 / (steps - 1).max(1) as f32;
                z.extend(v);
            }
        }
        let z = Tensor::from_vec(z, (dims * steps, d), input.x.device())?;
        Ok(Some(self.decode_mean(&z)?))
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
        self.active.add(&self.vae.encode(input.x)?.0)?;
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
