//! Binarisation of [0, 1] intensities, reproducible from (seed, epoch, row id) alone.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::seed::derive_seed;

const STATIC_STREAM: u64 = 3;
const DYNAMIC_STREAM: u64 = 4;

/// How intensities are binarised when a batch is assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binarize {
    /// Intensities as they are.
    None,
    /// One Bernoulli(x) draw per pixel, the same for every visit of a row during the run.
    Static,
    /// A fresh Bernoulli(x) draw per pixel on every visit (per epoch), seeded by the run seed.
    Dynamic,
}

/// Applies a [`Binarize`] mode with a run seed.
#[derive(Debug, Clone, Copy)]
pub struct Binarizer {
    mode: Binarize,
    seed: u64,
}

impl Binarizer {
    /// A binariser for the run seed.
    pub fn new(mode: Binarize, seed: u64) -> Self {
        Binarizer { mode, seed }
    }

    /// Binarises one example in place. The draws depend only on (seed, epoch, id), so they are
    /// the same at any world size and after a resume.
    pub fn apply(&self, x: &mut [f32], id: u64, epoch: u64) {
        let stream = match self.mode {
            Binarize::None => return,
            Binarize::Static => derive_seed(self.seed, &[STATIC_STREAM, id]),
            Binarize::Dynamic => derive_seed(self.seed, &[DYNAMIC_STREAM, epoch, id]),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        for v in x {
            let u: f32 = rng.random();
            *v = if u < *v { 1.0 } else { 0.0 };
        }
    }
}
