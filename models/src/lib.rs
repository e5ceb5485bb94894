//! The VAE family on candle: encoders/decoders, likelihoods, KL terms, objectives (ELBO, β,
//! warm-up, free bits, IWAE bound) behind one [`Model`] contract, and the [`Registry`] through
//! which `model.kind` selects a variant. Knows nothing of networks or files.

mod batch_norm;
mod bernoulli;
mod buffers;
mod builtin;
mod class_rows;
mod code_prior;
mod conv;
mod conv_gemm;
mod cpu;
mod cvae;
mod dense;
mod error;
mod fastmath;
mod forms;
mod gate;
mod gaussian;
mod grad_sink;
mod iwae;
mod ladder;
mod layers;
mod likelihood;
mod m2;
mod model;
mod noise;
mod normalise;
mod objective;
mod params;
mod quantiser;
mod registry;
mod spec;
mod vae;
mod vqvae;

pub use batch_norm::{BatchNorm, NormedMlp, Norming, Norms, Round};
pub use bernoulli::bernoulli_nll;
pub use buffers::Buffers;
pub use code_prior::{CodePrior, CodePriorConfig, PixelCnn};
pub use conv::{conv2d, conv2d_masked, ConvSpec};
pub use cvae::{Cvae, CvaeConfig};
pub use dense::{dense, dense_bernoulli_nll};
pub use error::{ModelError, Result};
pub use forms::ComposedForms;
pub use gate::gated_tanh;
pub use gaussian::reparameterise;
pub use grad_sink::GradSink;
pub use iwae::{iw_bound, ActiveUnits};
pub use ladder::{gaussian_kl_between, precision_merge, Ladder, LadderConfig, MAX_LAYERS};
pub use layers::{
    linear, linear_weight_normed, linear_without_bias, Activation, ConvDecoder, ConvEncoder,
    Linear, Mlp, ResidualBlock,
};
pub use likelihood::{Likelihood, LikelihoodKind};
pub use m2::{M2Config, M2Kind, M2};
pub use model::{
    round_statistics, whole_batch_statistics, CodeGrid, CodeModel, EvalOptions, Evaluator, Input,
    LabelUse, LatentModel, LossOutput, Metric, Metrics, Model, Picture, Statistics, StepContext,
    Term,
};
pub use noise::{Noise, Purpose};
pub use objective::{free_bits_statistics, gaussian_kl, vae_loss, Objective, VAE_TERMS};
pub use params::Params;
pub use quantiser::{nearest_codes, CodebookInit, CodebookLearning, RESTART_SLOTS, SEED_SLOTS};
pub use registry::{NoSection, Registry, Section, SectionError, Variant};
pub use spec::{Architecture, BaseModel, BuildContext, ModelSpec};
pub use vae::{BetaVae, Vae, VaeNet};
pub use vqvae::{VqVae, VqVae2, VqVaeConfig, CODEBOOK, EMA_COUNT, EMA_SUM};
