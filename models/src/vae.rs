//! The VAE (and β-VAE through the objective): diagonal Gaussian posterior, MLP or
//! convolutional encoder/decoder, any likelihood.

use std::ops::Range;

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gaussian::reparameterise;
use crate::layers::{linear, Activation, ConvDecoder, ConvEncoder, Linear, Mlp};
use crate::likelihood::{Likelihood, LikelihoodKind};
use crate::model::{Input, Model};
use crate::noise::{Noise, Purpose};
use crate::objective::{gaussian_kl, vae_loss, LossOutput, Objective};
use crate::params::Params;

/// Encoder/decoder architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Dense layers on the flattened example.
    Mlp,
    /// Stride-2 convolutions (28, 32 or 64 pixel square images).
    Conv,
}

/// Everything that defines a VAE's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeSpec {
    /// Example shape, e.g. `[1, 28, 28]`.
    pub input_shape: Vec<usize>,
    /// Latent dimension.
    pub latent_dim: usize,
    /// Encoder/decoder family.
    pub architecture: Architecture,
    /// Hidden layer sizes of the MLP encoder (the decoder mirrors them); for `Conv`, the
    /// dense layers between the convolutions and the latent.
    pub hidden: Vec<usize>,
    /// Nonlinearity.
    pub activation: Activation,
    /// Observation model.
    pub likelihood: LikelihoodKind,
    /// Variance of `GaussianFixed`.
    pub variance: f64,
    /// The posterior log-variance is clamped to ±this.
    pub log_var_clamp: f64,
}

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
    spec: VaeSpec,
    params: Params,
    trunk: Trunk,
    mu: Linear,
    log_var: Linear,
    likelihood: Likelihood,
    dim: usize,
}

impl Vae {
    /// Builds a VAE with parameters drawn from `seed`.
    pub fn new(spec: VaeSpec, device: &Device, seed: u64) -> Result<Self> {
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
    pub fn spec(&self) -> &VaeSpec {
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

impl Model for Vae {
    fn params(&self) -> &Params {
        &self.params
    }

    fn latent_dim(&self) -> usize {
        self.spec.latent_dim
    }

    fn loss(
        &self,
        input: &Input<'_>,
        noise: &Noise,
        step: u64,
        objective: &Objective,
    ) -> Result<LossOutput> {
        let (mu, log_var) = self.encode(input.x)?;
        let eps = noise.rows(
            Purpose::Train,
            step,
            input.ids,
            self.spec.latent_dim,
            input.x.device(),
        )?;
        let z = reparameterise(&mu, &log_var, &eps)?;
        let rec = self.likelihood.nll(&self.decode(&z)?, input.x)?;
        vae_loss(&rec, &gaussian_kl(&mu, &log_var)?, objective, step)
    }

    fn log_weights(
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

    fn posterior_mean(&self, input: &Input<'_>) -> Result<Tensor> {
        Ok(self.encode(input.x)?.0)
    }

    fn decode_mean(&self, z: &Tensor) -> Result<Tensor> {
        self.likelihood.mean(&self.decode(z)?)
    }
}
