//! The VAE family on candle: encoders/decoders, likelihoods, KL terms, objectives (ELBO, β,
//! warm-up, free bits, IWAE bound) behind one [`Model`] trait. Knows nothing of networks or files.

mod bernoulli;
mod cpu;
mod dense;
mod error;
mod gaussian;
mod grad_sink;
mod iwae;
mod layers;
mod likelihood;
mod model;
mod noise;
mod objective;
mod params;
mod vae;

pub use bernoulli::bernoulli_nll;
pub use dense::dense;
pub use error::{ModelError, Result};
pub use gaussian::reparameterise;
pub use grad_sink::GradSink;
pub use iwae::{iw_bound, ActiveUnits};
pub use layers::{linear, Activation, ConvDecoder, ConvEncoder, Linear, Mlp};
pub use likelihood::{Likelihood, LikelihoodKind};
pub use model::{Input, Model};
pub use noise::{Noise, Purpose};
pub use objective::{gaussian_kl, vae_loss, LossOutput, Objective};
pub use params::Params;
pub use vae::{Architecture, Vae, VaeSpec};
