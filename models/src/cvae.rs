//! The conditional VAE (Sohn et al. 2015; Kingma et al. 2014's M1 conditioned on y): the VAE
//! with the class label's one-hot code beside the encoder's input and the decoder's latent,
//! prior N(0, I) for every class. Its bounds are conditional: `nll_iw` bounds −log p(x|y).

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::Model;
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{BuildContext, ModelSpec};
use crate::vae::Vae;

/// `[model.cvae]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvaeConfig {
    /// Classes of the label (every row's label is in 0..classes).
    pub classes: u32,
}

impl Default for CvaeConfig {
    fn default() -> Self {
        CvaeConfig { classes: 10 }
    }
}

impl Section for CvaeConfig {
    fn validate(&self) -> Result<(), SectionError> {
        if !(2..=10_000).contains(&self.classes) {
            return Err(SectionError::new(
                "classes",
                format!("found {}, expected 2 to 10000 classes", self.classes),
            ));
        }
        Ok(())
    }
}

/// The `cvae` kind.
pub struct Cvae;

impl Variant for Cvae {
    const KIND: &'static str = "cvae";
    const ABOUT: &'static str =
        "conditional VAE: one-hot label into encoder and decoder, prior N(0, I); [model.cvae] classes";
    type Config = CvaeConfig;

    fn build(spec: &ModelSpec, cfg: &CvaeConfig, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        let vae = Vae::conditional(spec.clone(), cfg.classes as usize, &ctx.device, ctx.seed)?;
        Ok(Box::new(vae))
    }
}
