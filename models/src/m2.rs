//! Kingma et al. 2014's M2, the semi-supervised VAE: a classifier q(y|x), a conditional
//! encoder q(z|x,y) and decoder p(x|y,z), a uniform prior p(y) and p(z) = N(0, I).
//!
//! A labeled row (x, y) is trained on its bound `L(x,y) = −E_q[log p(x|y,z)] + KL(q(z|x,y) ‖ p(z))
//! − log p(y)` plus `alpha` times the classifier's cross-entropy `−log q(y|x)` (the
//! classifier learns from labels only there). An unlabeled row is trained on
//! `U(x) = Σ_y q(y|x)·L(x,y) − H(q(y|x))`, **enumerating every class exactly**: its rows are
//! repeated once per class and the conditional VAE runs once over the labeled rows and the
//! expanded unlabeled rows together.
//!
//! The objective of a global batch is the mean of `L + alpha·CE` over its labeled rows plus the
//! mean of `U` over its unlabeled rows. Each mean is normalised by the *global* batch's count
//! of such rows: the two counts are the model's batch statistics, all-reduced before the loss,
//! so N workers train what one process trains however the rows fall on the ranks.
//!
//! `alpha` convention: the weight of the labeled rows' mean cross-entropy beside the two mean
//! bounds (nats per example). Kingma et al.'s α = 0.1·N weighs a summed cross-entropy against a
//! summed bound; Pyro's 46 and Wohlert's 0.1·N_u/N_l are other scalings of the same term.
//!
//! **M1+M2** (`features_from`): M2 models a trained VAE's latent features instead of the
//! examples — in training a sample of the VAE's q(z|x) per row and visit (its own noise stream,
//! keyed by step and row id like every draw), in evaluation and pictures its mean — and draws
//! its samples, reconstructions and analogies through the VAE's decoder. The VAE is frozen: its
//! parameters are not M2's, so they are neither trained, all-reduced nor checkpointed with it;
//! every process loads them from the VAE's run.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gaussian::reparameterise;
use crate::iwae::iw_bound;
use crate::layers::Mlp;
use crate::likelihood::LikelihoodKind;
use crate::model::{
    EvalOptions, Evaluator, Input, LabelUse, LatentModel, LossOutput, Metric, Metrics, Model,
    Picture, Statistics, StepContext, Term,
};
use crate::noise::{Noise, Purpose};
use crate::params::Params;
use crate::registry::{Section, SectionError, Variant};
use crate::spec::{Architecture, BuildContext, ModelSpec};
use crate::vae::VaeNet;

/// `[model.m2]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct M2Config {
    /// Classes of the label.
    pub classes: u32,
    /// Weight of the labeled rows' mean classifier cross-entropy beside the mean bounds
    /// (default 100: on MNIST with 100 labels, 20 epochs at lr 1e-3, it beat 50 on both labeled
    /// subsets tried; 200 was mixed, −0.1 and +1.5 points on two subsets).
    pub alpha: f64,
    /// Hidden layer sizes of the classifier q(y|x) (empty: those of `model.hidden`).
    pub classifier_hidden: Vec<u32>,
    /// The run directory of a trained `vae` or `beta_vae` (empty: none): M2 then models that
    /// VAE's latent features of each example (M1+M2), with `model.architecture = "mlp"` and a
    /// Gaussian `model.likelihood` (the features are real vectors). Its bounds (`neg_elbo`,
    /// `nll_iw`) are then of the features, not of the examples.
    pub features_from: String,
}

impl Default for M2Config {
    fn default() -> Self {
        M2Config {
            classes: 10,
            alpha: 100.0,
            classifier_hidden: Vec::new(),
            features_from: String::new(),
        }
    }
}

impl Section for M2Config {
    fn validate(&self) -> Result<(), SectionError> {
        if !(2..=1000).contains(&self.classes) {
            return Err(SectionError::new(
                "classes",
                format!("found {}, expected 2 to 1000 classes", self.classes),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(SectionError::new(
                "alpha",
                format!("found {}, expected a finite number ≥ 0", self.alpha),
            ));
        }
        if self.classifier_hidden.contains(&0) {
            return Err(SectionError::new(
                "classifier_hidden",
                format!(
                    "{:?} holds a 0, expected positive layer sizes",
                    self.classifier_hidden
                ),
            ));
        }
        Ok(())
    }

    fn base_run(&self) -> Option<&str> {
        (!self.features_from.is_empty()).then_some(self.features_from.as_str())
    }
}

/// The terms M2 reports, sorted.
const TERMS: [&str; 6] = [
    "accuracy",
    "ce",
    "kl_weight",
    "loss",
    "neg_elbo",
    "neg_elbo_labeled",
];

/// The semi-supervised VAE.
pub struct M2 {
    params: Params,
    vae: VaeNet,
    classifier: Mlp,
    classes: usize,
    alpha: f64,
    /// The trained VAE whose features M2 models (M1+M2), checked to have a [`LatentModel`].
    features: Option<Box<dyn Model>>,
}

/// The `m2` kind.
pub struct M2Kind;

impl Variant for M2Kind {
    const KIND: &'static str = "m2";
    const ABOUT: &'static str =
        "semi-supervised VAE (Kingma et al. 2014): classifier q(y|x), q(z|x,y), p(x|y,z); [model.m2] classes, alpha, features_from (M1+M2: on a VAE run's features)";
    type Config = M2Config;

    fn build(spec: &ModelSpec, cfg: &M2Config, ctx: &BuildContext) -> Result<Box<dyn Model>> {
        let features = match cfg.base_run() {
            None => None,
            Some(run) => Some(ctx.base.take().ok_or_else(|| {
                ModelError::Spec(format!(
                    "m2 needs the trained run model.m2.features_from = {run:?}, loaded by the program; none was given"
                ))
            })?),
        };
        Ok(Box::new(M2::new(
            spec,
            cfg,
            features,
            &ctx.device,
            ctx.seed,
        )?))
    }
}

/// Indices of the labeled and the unlabeled rows of a batch, and the labels of the first.
struct Split {
    labeled: Vec<u32>,
    labels: Vec<Option<i64>>,
    unlabeled: Vec<u32>,
}

impl M2 {
    /// An M2 with parameters drawn from `seed`: the conditional VAE's, then the classifier's;
    /// on the features of `features` (a trained model with a [`LatentModel`]) when given, of
    /// examples of `spec.input_shape` otherwise.
    pub fn new(
        spec: &ModelSpec,
        cfg: &M2Config,
        features: Option<Box<dyn Model>>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        if spec.objective.free_bits > 0.0 {
            return Err(ModelError::Spec(
                "model.free_bits is not available for m2: its KL terms are weighted by q(y|x)"
                    .into(),
            ));
        }
        let mut spec = spec.clone();
        if let Some(base) = &features {
            spec.input_shape = vec![feature_dim(&spec, cfg, base.as_ref())?];
        }
        let classes = cfg.classes as usize;
        let mut params = Params::new(device, seed);
        let vae = VaeNet::new(&mut params, spec.clone(), classes)?;
        let dim: usize = spec.input_shape.iter().product();
        let hidden: Vec<usize> = if cfg.classifier_hidden.is_empty() {
            spec.hidden.clone()
        } else {
            cfg.classifier_hidden.iter().map(|h| *h as usize).collect()
        };
        let mut sizes = vec![dim];
        sizes.extend(hidden);
        sizes.push(classes);
        let classifier = Mlp::new(&mut params, "classifier", &sizes, spec.activation)?;
        Ok(M2 {
            params,
            vae,
            classifier,
            classes,
            alpha: cfg.alpha,
            features,
        })
    }

    fn base(&self) -> Option<&dyn LatentModel> {
        self.features.as_deref().and_then(|m| m.latent())
    }

    /// What M2's networks read of examples `x`: the examples themselves, or (M1+M2) the VAE's
    /// features of them — a sample of q(z|x) per row from the stream of (`draw`'s step, row id)
    /// when `draw` is given (training), the mean otherwise.
    fn observed(&self, x: &Tensor, ids: &[u64], draw: Option<(&Noise, u64)>) -> Result<Tensor> {
        let Some(base) = self.base() else {
            return Ok(x.clone());
        };
        let (mu, log_var) = base.encode_latent(x)?;
        let z = match draw {
            None => mu,
            Some((noise, step)) => {
                let d = base.latent_dim();
                let eps = noise.rows(Purpose::Features, step, ids, d, x.device())?;
                reparameterise(&mu, &log_var, &eps)?
            }
        };
        Ok(z.detach())
    }

    /// M2's decoded means in data space: through the VAE's decoder on its features (M1+M2).
    fn to_data(&self, means: Tensor) -> Result<Tensor> {
        match self.base() {
            Some(base) => Ok(base.decode_latent(&means)?.detach()),
            None => Ok(means),
        }
    }

    /// The classifier's logits (B, K).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.classifier.forward(x, false)
    }

    fn split(&self, input: &Input<'_>) -> Result<Split> {
        let mut split = Split {
            labeled: Vec::new(),
            labels: Vec::new(),
            unlabeled: Vec::new(),
        };
        for (i, (label, id)) in input.labels.iter().zip(input.ids).enumerate() {
            match label {
                Some(y) if (0..self.classes as i64).contains(y) => {
                    split.labeled.push(i as u32);
                    split.labels.push(Some(*y));
                }
                Some(y) => {
                    return Err(ModelError::Input(format!(
                        "row {id} has label {y}, but the model has {} classes (0 to {})",
                        self.classes,
                        self.classes - 1
                    )))
                }
                None => split.unlabeled.push(i as u32),
            }
        }
        Ok(split)
    }

    /// The rows' labels where they have one, the classifier's guess where not.
    fn labels_or_guesses(&self, input: &Input<'_>) -> Result<Vec<Option<i64>>> {
        let guesses = self.logits(input.x)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        Ok(input
            .labels
            .iter()
            .zip(guesses)
            .map(|(l, g)| Some(l.unwrap_or(i64::from(g))))
            .collect())
    }

    /// The per-row negative bounds `−ELBO(x, y) = rec + KL + log K` of the labeled rows with
    /// their labels and of the unlabeled rows with every class, in one pass of the conditional
    /// VAE; KL weighted by `kl_weight` (the training objective) and unweighted (the bound).
    fn bounds(
        &self,
        input: &Input<'_>,
        split: &Split,
        counter: u64,
        purpose: Purpose,
        noise: &crate::noise::Noise,
        kl_weight: f64,
    ) -> Result<(Tensor, Tensor)> {
        let k = self.classes;
        let mut rows = split.labeled.clone();
        let mut labels = split.labels.clone();
        for u in &split.unlabeled {
            for c in 0..k {
                rows.push(*u);
                labels.push(Some(c as i64));
            }
        }
        let ids: Vec<u64> = rows.iter().map(|r| input.ids[*r as usize]).collect();
        let index = Tensor::from_vec(rows.clone(), rows.len(), input.x.device())?;
        let x = input.x.index_select(&index, 0)?;
        let expanded = Input {
            x: &x,
            labels: &labels,
            ids: &ids,
        };
        let (rec, kl_dims) =
            self.vae
                .terms_rows(input.x, Some(&index), &expanded, noise, purpose, counter)?;
        let kl = kl_dims.sum(D::Minus1)?;
        let log_k = (k as f64).ln();
        let bound = ((&rec + &kl)? + log_k)?;
        let trained = if kl_weight == 1.0 {
            bound.clone()
        } else {
            ((rec + (kl * kl_weight)?)? + log_k)?
        };
        Ok((trained, bound))
    }

    /// `U(x) = Σ_y q(y|x)·L(x,y) − H(q(y|x))` per unlabeled row from the bounds of every class
    /// (B_u, K) and the classifier's logits (B_u, K).
    fn unlabeled_bound(bounds: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let q = softmax(logits, D::Minus1)?;
        let log_q = log_softmax(logits, D::Minus1)?;
        Ok((&q * (bounds + log_q)?)?.sum(D::Minus1)?)
    }

    /// Rows (indices into `x`) of a tensor.
    fn rows(t: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let index = Tensor::from_vec(rows.to_vec(), rows.len(), t.device())?;
        Ok(t.index_select(&index, 0)?)
    }
}

impl Model for M2 {
    fn params(&self) -> &Params {
        &self.params
    }

    fn statistics(&self) -> Statistics {
        Statistics {
            terms: TERMS.to_vec(),
            batch: vec![2],
            update: 0,
        }
    }

    fn labels(&self) -> LabelUse {
        LabelUse::Partial {
            classes: self.classes,
        }
    }

    /// Labeled and unlabeled rows of this rank's batch.
    fn batch_statistics(&self, input: &Input<'_>, _: &StepContext<'_>, _: usize) -> Result<Tensor> {
        let labeled = input.labels.iter().filter(|l| l.is_some()).count();
        let counts = [labeled as f32, (input.labels.len() - labeled) as f32];
        Ok(Tensor::new(&counts, input.x.device())?)
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> Result<LossOutput> {
        let [n_labeled, n_unlabeled] = ctx.batch_stats else {
            return Err(ModelError::Input(format!(
                "m2 needs the global batch's labeled and unlabeled row counts, got {} values",
                ctx.batch_stats.len()
            )));
        };
        let x = self.observed(input.x, input.ids, Some((ctx.noise, ctx.step)))?;
        let input = &Input { x: &x, ..*input };
        let device = input.x.device();
        let split = self.split(input)?;
        let (nl, nu, k) = (split.labeled.len(), split.unlabeled.len(), self.classes);
        let weight = self.vae.spec().objective.kl_weight(ctx.step);
        let (trained, bound) =
            self.bounds(input, &split, ctx.step, Purpose::Train, ctx.noise, weight)?;
        let logits = self.logits(input.x)?;
        let zero = || Tensor::new(0f32, device);
        let mut loss = zero()?;
        let mut terms = BTreeMap::new();
        if nl > 0 {
            let classes = self
                .vae
                .condition(&split.labels, &vec![0; nl], device)?
                .expect("m2's VAE is conditional");
            let log_q = log_softmax(&Self::rows(&logits, &split.labeled)?, D::Minus1)?;
            let ce = log_q.gather(&classes.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
            let labeled = (trained.narrow(0, 0, nl)? + (&ce * self.alpha)?)?;
            loss = (loss + (labeled.sum_all()? / f64::from(*n_labeled))?)?;
            let guesses = log_q.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = guesses
                .iter()
                .zip(&split.labels)
                .filter(|(g, l)| Some(i64::from(**g)) == **l)
                .count();
            terms.insert("ce", Term::per_row(&ce)?);
            terms.insert("neg_elbo_labeled", Term::per_row(&bound.narrow(0, 0, nl)?)?);
            terms.insert(
                "accuracy",
                Term {
                    sum: Tensor::new(correct as f32, device)?,
                    count: nl as f64,
                },
            );
        }
        if nu > 0 {
            let unlabeled_logits = Self::rows(&logits, &split.unlabeled)?;
            let trained_u = trained.narrow(0, nl, nu * k)?.reshape((nu, k))?;
            let u = Self::unlabeled_bound(&trained_u, &unlabeled_logits)?;
            loss = (loss + (u.sum_all()? / f64::from(*n_unlabeled))?)?;
            let bound_u = bound.narrow(0, nl, nu * k)?.reshape((nu, k))?;
            terms.insert(
                "neg_elbo",
                Term::per_row(&Self::unlabeled_bound(&bound_u, &unlabeled_logits)?.detach())?,
            );
        }
        for (name, count) in [
            ("ce", nl),
            ("neg_elbo_labeled", nl),
            ("accuracy", nl),
            ("neg_elbo", nu),
        ] {
            if count == 0 {
                terms.insert(
                    name,
                    Term {
                        sum: zero()?,
                        count: 0.0,
                    },
                );
            }
        }
        let rows = input.ids.len();
        terms.insert("kl_weight", Term::constant(weight, rows, device)?);
        terms.insert(
            "loss",
            Term {
                sum: loss.detach(),
                count: rows as f64 / ctx.global_rows.max(1) as f64,
            },
        );
        Ok(LossOutput {
            loss,
            terms,
            update_stats: None,
        })
    }

    fn evaluator<'a>(&'a self, options: EvalOptions<'a>) -> Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(M2Evaluator {
            m2: self,
            options,
            rows: 0,
            labeled: 0,
            correct: 0,
            neg_elbo: 0.0,
            nll_iw: 0.0,
        }))
    }

    fn sample(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[i64]>,
        device: &Device,
    ) -> Result<Tensor> {
        self.to_data(self.vae.sample(n, seed, labels, device)?)
    }

    fn reconstruct(&self, input: &Input<'_>) -> Result<Tensor> {
        let x = self.observed(input.x, input.ids, None)?;
        let input = Input { x: &x, ..*input };
        let labels = self.labels_or_guesses(&input)?;
        self.to_data(self.vae.reconstruct(&Input {
            labels: &labels,
            ..input
        })?)
    }

    fn traversals(
        &self,
        input: &Input<'_>,
        max_dims: usize,
        steps: usize,
    ) -> Result<Option<Tensor>> {
        let x = self.observed(input.x, input.ids, None)?;
        let input = Input { x: &x, ..*input };
        let labels = self.labels_or_guesses(&input)?;
        let input = Input {
            labels: &labels,
            ..input
        };
        Ok(Some(
            self.to_data(self.vae.traversals(&input, max_dims, steps)?)?,
        ))
    }

    /// Analogies: each row's style (its posterior mean under its label, or the classifier's
    /// guess) drawn as every class, one column per class.
    fn pictures(&self, input: &Input<'_>) -> Result<Vec<Picture>> {
        let rows = input.ids.len().min(8);
        let x = self.observed(&input.x.narrow(0, 0, rows)?, &input.ids[..rows], None)?;
        let labels = self.labels_or_guesses(&Input {
            x: &x,
            labels: &input.labels[..rows],
            ids: &input.ids[..rows],
        })?;
        let ids = &input.ids[..rows];
        let device = x.device();
        let y = self.vae.condition(&labels, ids, device)?;
        let (mu, _) = self.vae.encode(&x, y.as_ref())?;
        let k = self.classes;
        let d = mu.dim(1)?;
        let z = mu
            .unsqueeze(1)?
            .broadcast_as((rows, k, d))?
            .reshape((rows * k, d))?;
        let classes: Vec<Option<i64>> = (0..rows * k).map(|i| Some((i % k) as i64)).collect();
        let ys = self
            .vae
            .condition(&classes, &vec![0; rows * k], device)?
            .expect("m2's VAE is conditional");
        let values = self
            .to_data(self.vae.decode_mean(&z, Some(&ys))?)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(vec![Picture {
            name: "analogies".into(),
            values,
            cols: k,
        }])
    }
}

/// M2's test figures: the classifier's accuracy on the labeled rows, the unlabeled bound on
/// −log p(x) and its importance-weighted version, enumerating y inside the weights.
struct M2Evaluator<'a> {
    m2: &'a M2,
    options: EvalOptions<'a>,
    rows: u64,
    labeled: u64,
    correct: u64,
    neg_elbo: f64,
    nll_iw: f64,
}

impl Evaluator for M2Evaluator<'_> {
    fn add(&mut self, input: &Input<'_>) -> Result<()> {
        let m2 = self.m2;
        let x = m2.observed(input.x, input.ids, None)?;
        let input = &Input { x: &x, ..*input };
        let b = input.ids.len();
        let k = m2.classes;
        let logits = m2.logits(input.x)?;
        let guesses = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (g, l) in guesses.iter().zip(input.labels) {
            if let Some(l) = l {
                self.labeled += 1;
                self.correct += u64::from(i64::from(*g) == *l);
            }
        }
        let all = Split {
            labeled: Vec::new(),
            labels: Vec::new(),
            unlabeled: (0..b as u32).collect(),
        };
        let (_, bound) = m2.bounds(input, &all, 0, Purpose::Train, self.options.noise, 1.0)?;
        let u = M2::unlabeled_bound(&bound.reshape((b, k))?, &logits)?;
        self.neg_elbo += f64::from(u.sum_all()?.to_scalar::<f32>()?);
        if let Some(samples) = self.options.iw_samples {
            // log p(x) ≥ log Σ_y p(y)·(1/k)Σ_s w_s(y): one IW bound per class, summed exactly.
            let mut per_class = Vec::with_capacity(k);
            for c in 0..k {
                let labels = vec![Some(c as i64); b];
                let given = Input {
                    labels: &labels,
                    ..*input
                };
                per_class.push(iw_bound(b, samples, self.options.max_rows, |s| {
                    m2.vae.log_weights(&given, self.options.noise, s)
                })?);
            }
            let log_k = (k as f64).ln();
            for row in 0..b {
                let terms: Vec<f64> = per_class.iter().map(|c| c[row] - log_k).collect();
                let top = terms.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v));
                let log_px = top + terms.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
                self.nll_iw -= log_px;
            }
        }
        self.rows += b as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        let n = self.rows.max(1) as f64;
        let mut m = Metrics::from([
            ("neg_elbo".to_string(), Metric::Value(self.neg_elbo / n)),
            ("labeled_rows".to_string(), Metric::Count(self.labeled)),
        ]);
        if self.labeled > 0 {
            m.insert(
                "accuracy".into(),
                Metric::Value(self.correct as f64 / self.labeled as f64),
            );
        }
        if let Some(k) = self.options.iw_samples {
            m.insert("nll_iw".into(), Metric::Value(self.nll_iw / n));
            m.insert("iw_samples".into(), Metric::Count(k as u64));
        }
        m
    }
}

/// The dimension of the features M2 reads of `base` (M1+M2), checked against the data and the
/// model's settings.
fn feature_dim(spec: &ModelSpec, cfg: &M2Config, base: &dyn Model) -> Result<usize> {
    let run = &cfg.features_from;
    let latent = base.latent().ok_or_else(|| {
        ModelError::Spec(format!(
            "model.m2.features_from = {run:?}: that run's model has no continuous latent to read without a label (expected a vae or beta_vae run)"
        ))
    })?;
    let dim: usize = spec.input_shape.iter().product();
    if latent.example_len() != dim {
        return Err(ModelError::Spec(format!(
            "model.m2.features_from = {run:?} encodes examples of {} values, but data.train's have {dim} (shape {:?}): train M2 on that run's data",
            latent.example_len(),
            spec.input_shape
        )));
    }
    if spec.architecture != Architecture::Mlp {
        return Err(ModelError::Spec(format!(
            "model.architecture = \"conv\": M2 on a VAE's features (model.m2.features_from) reads vectors of {}; expected \"mlp\"",
            latent.latent_dim()
        )));
    }
    if spec.likelihood == LikelihoodKind::Bernoulli {
        return Err(ModelError::Spec(
            "model.likelihood = \"bernoulli\" models values in [0, 1]; M2 on a VAE's features (model.m2.features_from, real vectors) needs \"gaussian_fixed\", \"gaussian_global\" or \"gaussian_per_dim\"".into(),
        ));
    }
    Ok(latent.latent_dim())
}
