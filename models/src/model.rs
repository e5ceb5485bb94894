//! The contract every model of the family implements, and what makes N workers train exactly
//! what one process trains.
//!
//! **Sums, not means.** A step's loss is this rank's share of the global objective: sums over
//! its rows divided by a normaliser that is the same on every rank (the global batch's row
//! count, [`StepContext::global_rows`]), so the gradients of all ranks *add up* to the gradient
//! of the global batch. Reported terms are sums with their counts ([`Term`]); they travel in the
//! flat buffer with the gradients and are divided only after the all-reduce.
//!
//! **Batch statistics before the loss.** A loss that needs a non-linear function of the whole
//! global batch (free bits clamp the batch-mean KL of each latent dimension) declares
//! [`Statistics::batch`] sums; the trainer computes them on every rank
//! ([`Model::batch_statistics`]), all-reduces them, and hands the global sums to
//! [`Model::loss`] in [`StepContext::batch_stats`]. The non-linear function is applied to the
//! global sums, identically on every rank. Sums that depend on other global sums (batch norm:
//! a layer's moments depend on the layers below it being normalised by theirs) come in
//! *rounds*: round `r` is computed knowing the global sums of rounds `0..r`. A model's state
//! may ask for more rounds on one step ([`Model::batch_rounds`]: a codebook's k-means
//! initialisation on the first global batch).
//!
//! **State after the step.** Non-gradient state ([`Buffers`]: EMA codebooks, running moments)
//! is updated from sums ([`LossOutput::update_stats`]) that ride in the same all-reduce as the
//! gradients, in [`Model::update_state`], identically on every replica. The trainer writes the
//! buffers into checkpoints, hands them to joining workers and covers them with the replica
//! checksum.
//!
//! Everything a model reports is declared up front in [`Model::statistics`], so the flat buffer's
//! layout is known before the first batch, and a rank with no rows in a (short, final) batch
//! contributes zeros of the right length.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::buffers::Buffers;
use crate::error::Result;
use crate::noise::Noise;
use crate::params::Params;

/// One minibatch as a model sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Examples, (B, D) with D the flattened example size.
    pub x: &'a Tensor,
    /// Labels (`None` = unlabeled).
    pub labels: &'a [Option<i64>],
    /// Stable row ids: the noise of an example is drawn from a stream keyed by its id.
    pub ids: &'a [u64],
}

/// What a step's loss needs besides its rows.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The global step (0-based): keys the noise and the schedules.
    pub step: u64,
    /// The run's noise.
    pub noise: &'a Noise,
    /// Rows of the global batch, every rank's together: the normaliser of per-example means.
    pub global_rows: u64,
    /// Global sums of [`Model::batch_statistics`] for this step, the rounds one after another:
    /// every round's in [`Model::loss`], those before the round being computed in
    /// [`Model::batch_statistics`] (empty when the model declares none).
    pub batch_stats: &'a [f32],
}

/// A reported term: a sum over this rank's rows and the count it is a mean over. After the
/// all-reduce the trainer reports `Σ sum / Σ count`.
#[derive(Debug, Clone)]
pub struct Term {
    /// A scalar tensor.
    pub sum: Tensor,
    /// What the sum is divided by (rows, labeled rows, …).
    pub count: f64,
}

impl Term {
    /// The sum over the rows of a per-row tensor (B,), counted per row.
    pub fn per_row(values: &Tensor) -> Result<Term> {
        Ok(Term {
            sum: values.sum_all()?,
            count: values.elem_count() as f64,
        })
    }

    /// A value that is the same for every row (a schedule's weight), counted per row.
    pub fn constant(value: f64, rows: usize, device: &Device) -> Result<Term> {
        Ok(Term {
            sum: Tensor::new((value * rows as f64) as f32, device)?,
            count: rows as f64,
        })
    }

    /// A scalar tensor that is the same for every row (a figure of the model's state, left on
    /// its device), counted per row.
    pub fn repeated(value: &Tensor, rows: usize) -> Result<Term> {
        Ok(Term {
            sum: value.affine(rows as f64, 0.0)?,
            count: rows as f64,
        })
    }
}

/// The result of a loss evaluation.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar to minimise: this rank's share of the global objective (see the module docs).
    pub loss: Tensor,
    /// Reported terms by name, exactly those of [`Statistics::terms`].
    pub terms: BTreeMap<&'static str, Term>,
    /// Sums the state update needs, [`Statistics::update`] values (1-D), or `None` when none.
    pub update_stats: Option<Tensor>,
}

/// What a model reports besides gradients, declared before the first step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statistics {
    /// Names of the reported terms, sorted; `loss` (the objective) among them.
    pub terms: Vec<&'static str>,
    /// Lengths of the rounds of batch statistics the loss needs from the global batch, in the
    /// order they are computed (empty: none); a step may add more ([`Model::batch_rounds`]).
    pub batch: Vec<usize>,
    /// Length of the update statistics (0: no state update).
    pub update: usize,
}

/// Settings of an evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions<'a> {
    /// Noise of the evaluation (its own stream, seeded from the run).
    pub noise: &'a Noise,
    /// Importance samples of the IW bound (`None`: no bound).
    pub iw_samples: Option<usize>,
    /// Memory budget of one importance-weighted decode, in rows (samples × batch).
    pub max_rows: usize,
}

/// A named evaluation figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Metric {
    /// A count.
    Count(u64),
    /// A real number (nats per example, a fraction, …).
    Value(f64),
    /// One value per layer, per code, ….
    List(Vec<f64>),
}

/// Evaluation figures by name.
pub type Metrics = BTreeMap<String, Metric>;

/// Accumulates a model's evaluation over batches.
pub trait Evaluator {
    /// Adds one batch.
    fn add(&mut self, input: &Input<'_>) -> Result<()>;
    /// The figures over every batch added.
    fn finish(self: Box<Self>) -> Metrics;
}

/// A picture a model draws of itself, beside the common ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    /// File stem (`codebook` → `codebook.png`).
    pub name: String,
    /// Examples in data space, row-major, each the size of one example.
    pub values: Vec<f32>,
    /// Examples per row of the grid.
    pub cols: usize,
}

/// What a model needs of the data's labels (checked over the whole data before training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelUse {
    /// Labels are not read.
    Ignored,
    /// Every row needs a label in `0..classes` (a conditional model).
    Every {
        /// Number of classes.
        classes: usize,
    },
    /// Labels in `0..classes` where there are any; unlabeled rows are welcome, but some rows
    /// of the training data need a label (a semi-supervised model).
    Partial {
        /// Number of classes.
        classes: usize,
    },
}

impl LabelUse {
    /// The number of classes, for models that read labels.
    pub fn classes(self) -> Option<usize> {
        match self {
            LabelUse::Ignored => None,
            LabelUse::Every { classes } | LabelUse::Partial { classes } => Some(classes),
        }
    }
}

/// One grid of discrete codes of a [`CodeModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeGrid {
    /// Codes a position can hold (the codebook's size).
    pub codes: usize,
    /// Rows of the grid.
    pub height: usize,
    /// Columns of the grid.
    pub width: usize,
}

impl CodeGrid {
    /// Positions of the grid.
    pub fn positions(&self) -> usize {
        self.height * self.width
    }
}

/// A model whose latent is one or more grids of discrete codes (a VQ-VAE): what a prior over
/// its codes reads and writes. Grids are listed bottom (finest) first; codes are row-major per
/// example, one example after another.
pub trait CodeModel {
    /// The code grids, bottom first.
    fn code_grids(&self) -> Vec<CodeGrid>;
    /// Size of one example the encoder reads (C·H·W).
    fn example_len(&self) -> usize;
    /// The codes of each example of `x` (B, C·H·W), per grid: B·positions indices each.
    fn encode_codes(&self, x: &Tensor) -> Result<Vec<Vec<u32>>>;
    /// Decodes `n` examples' codes of every grid (bottom first) to means in data space: (n, D).
    fn decode_codes(&self, codes: &[Vec<u32>], n: usize) -> Result<Tensor>;
}

/// A model with a continuous latent whose encoder and decoder another model reads: M2 trained
/// on a VAE's latent features (M1+M2), decoding its own outputs back to data space.
pub trait LatentModel {
    /// Dimension of the latent.
    fn latent_dim(&self) -> usize;
    /// Size of one example the encoder reads.
    fn example_len(&self) -> usize;
    /// q(z|x) of examples `x` (B, D): (μ, log σ²), each (B, latent_dim).
    fn encode_latent(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    /// The means of p(x|z) of latents `z` (N, latent_dim): (N, D).
    fn decode_latent(&self, z: &Tensor) -> Result<Tensor>;
}

/// A latent-variable model trained by a variational bound (or its relatives).
pub trait Model: Send {
    /// The trainable parameters, by name.
    fn params(&self) -> &Params;

    /// Non-gradient state (none by default).
    fn buffers(&self) -> Option<&Buffers> {
        None
    }

    /// What the model reports besides gradients.
    fn statistics(&self) -> Statistics;

    /// What it needs of the data's labels (nothing by default).
    fn labels(&self) -> LabelUse {
        LabelUse::Ignored
    }

    /// The rounds of batch statistics of the next step: [`Statistics::batch`], unless the
    /// model's state asks for more (a k-means initialisation of a codebook on the first applied
    /// step). A function of the replicated state, so every rank agrees.
    fn batch_rounds(&self) -> Result<Vec<usize>> {
        Ok(self.statistics().batch)
    }

    /// Sums over this rank's rows that the loss needs from the global batch, for round `round`
    /// of [`Model::batch_rounds`]: a 1-D tensor of that round's length; `ctx.batch_stats` holds
    /// the global sums of the rounds before it (only called when the model declares rounds).
    fn batch_statistics(
        &self,
        input: &Input<'_>,
        ctx: &StepContext<'_>,
        round: usize,
    ) -> Result<Tensor> {
        let _ = (input, ctx, round);
        Err(crate::ModelError::Spec(
            "the model declares batch statistics but does not compute them".into(),
        ))
    }

    /// The training loss of this rank's rows of a global batch.
    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput>;

    /// Updates the non-gradient state from the all-reduced update statistics of a step that
    /// was applied (only called when [`Statistics::update`] is not 0).
    fn update_state(&mut self, stats: &[f32], step: u64) -> Result<()> {
        let _ = (stats, step);
        Ok(())
    }

    /// An evaluator of the model on test data.
    fn evaluator<'a>(&'a self, options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>>;

    /// `n` examples drawn from the model, as means of the observation model: (n, D). With
    /// `labels` (one per example), conditioned on them: a model that reads labels needs them,
    /// the others ignore them.
    fn sample(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor>;

    /// Reconstructions of the input: (B, D).
    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor>;

    /// Latent traversals around one example (`input` holds one row): `steps` decodes for each
    /// of the first `max_dims` latent dimensions, as (dims × steps, D); `None` if the model has
    /// no continuous latent to traverse.
    fn traversals(
        &self,
        input: &Input<'_>,
        max_dims: usize,
        steps: usize,
    ) -> Result<Option<Tensor>> {
        let _ = (input, max_dims, steps);
        Ok(None)
    }

    /// Pictures of its own (codebook usage, per-layer traversals …), drawn from a test batch.
    fn pictures(&self, input: &Input<'_>) -> Result<Vec<Picture>> {
        let _ = input;
        Ok(Vec::new())
    }

    /// Its code grids, for a model whose latent is discrete codes (a prior can be trained
    /// over them); `None` by default.
    fn codes(&self) -> Option<&dyn CodeModel> {
        None
    }

    /// Its encoder and decoder, for a model with one continuous latent that reads no label
    /// (another model can be trained on its features); `None` by default.
    fn latent(&self) -> Option<&dyn LatentModel> {
        None
    }
}

/// This rank's sums of round `round` of the batch statistics (`ctx.batch_stats` holding the
/// global sums of the rounds before it), as f32, checked against the round's declared `len`.
pub fn round_statistics(
    model: &dyn Model,
    input: &Input<'_>,
    ctx: &StepContext<'_>,
    round: usize,
    len: usize,
) -> Result<Vec<f32>> {
    let values = model
        .batch_statistics(input, ctx, round)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if values.len() != len {
        return Err(crate::ModelError::Spec(format!(
            "round {round} of the batch statistics holds {} values, the model declared {len}",
            values.len()
        )));
    }
    Ok(values)
}

/// The batch statistics of a process that holds the whole global batch (no all-reduce): every
/// round of [`Model::batch_rounds`] computed in turn, each knowing the ones before it.
pub fn whole_batch_statistics(
    model: &dyn Model,
    input: &Input<'_>,
    ctx: &StepContext<'_>,
) -> Result<Vec<f32>> {
    let mut stats = Vec::new();
    for (round, len) in model.batch_rounds()?.into_iter().enumerate() {
        let ctx = StepContext {
            batch_stats: &stats,
            ..*ctx
        };
        let values = round_statistics(model, input, &ctx, round, len)?;
        stats.extend(values);
    }
    Ok(stats)
}
