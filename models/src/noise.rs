//! Seeded Gaussian noise, one stream per (purpose, step, row id): the same example gets the
//! same noise at any world size and after a resume.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::Result;

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a noise draw is for; part of its seed, so the streams never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Reparameterisation during training.
    Train = 1,
    /// Importance samples during evaluation.
    Eval = 2,
    /// Prior samples for pictures.
    Sample = 3,
    /// Choices of a model's state update (which encoder output restarts a dead code).
    Choice = 4,
    /// Features drawn from a trained model's posterior (M2 on a VAE's latent).
    Features = 5,
}

/// A source of reproducible standard-normal noise.
#[derive(Debug, Clone, Copy)]
pub struct Noise {
    seed: u64,
}

impl Noise {
    /// Noise derived from the run seed.
    pub fn new(seed: u64) -> Self {
        Noise { seed }
    }

    /// An `(ids.len() × dim)` tensor: row `i` is drawn from the stream of
    /// `(purpose, counter, ids[i])` — e.g. counter = the global step.
    pub fn rows(
        &self,
        purpose: Purpose,
        counter: u64,
        ids: &[u64],
        dim: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut values = Vec::with_capacity(ids.len() * dim);
        for id in ids {
            let stream = self.stream(purpose, counter, *id);
            let mut rng = ChaCha8Rng::seed_from_u64(stream);
            values.extend((0..dim).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
        }
        Ok(Tensor::from_vec(values, (ids.len(), dim), device)?)
    }

    /// The seed of the stream of (purpose, counter, key).
    fn stream(&self, purpose: Purpose, counter: u64, key: u64) -> u64 {
        mix(mix(mix(self.seed ^ 0x5851_f42d_4c95_7f2d) ^ purpose as u64) ^ mix(counter))
            ^ mix(key.wrapping_add(0x9e37_79b9_7f4a_7c15))
    }

    /// A uniform draw in [0, 1) keyed by (purpose, counter, key, sub): the same value on every
    /// rank and at any world size for the same keys (e.g. counter = the step, key = a row id,
    /// sub = a position in it).
    pub fn uniform(&self, purpose: Purpose, counter: u64, key: u64, sub: u64) -> f64 {
        let bits = mix(self.stream(purpose, counter, key) ^ mix(sub ^ 0xd1b5_4a32_d192_ed03));
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }
}
