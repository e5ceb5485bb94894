//! The built-in model variants: one line each.

use crate::code_prior::CodePrior;
use crate::cvae::Cvae;
use crate::ladder::Ladder;
use crate::m2::M2Kind;
use crate::registry::Registry;
use crate::vae::{BetaVae, Vae};
use crate::vqvae::{VqVae, VqVae2};

impl Registry {
    /// A registry of the built-in variants.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        r.register::<Vae>();
        r.register::<BetaVae>();
        r.register::<Cvae>();
        r.register::<M2Kind>();
        r.register::<VqVae>();
        r.register::<VqVae2>();
        r.register::<Ladder>();
        r.register::<CodePrior>();
        r
    }
}
