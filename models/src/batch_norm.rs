//! Batch normalisation over the global batch, exact: N workers compute the gradients one
//! process computes, and the gradient is batch norm's (through the moments), not the
//! stop-gradient approximation.
//!
//! In training a layer normalises by the moments of the *global* batch,
//! `y = γ·x̂ + β` with `x̂ = (h − μ)/σ`, `σ = √(var + ε)`, and its gradient with respect to h is
//! `∂L/∂h_r = γ/σ·(g_r − Σg/N − x̂_r·Σ(g·x̂)/N)` with `g = ∂L/∂y`, sums over the global batch.
//! PyTorch's SyncBN all-reduces the moments during the forward pass and `Σg`, `Σg·x̂` during
//! the backward pass. Here both travel as rounds of batch statistics
//! ([`crate::Statistics::batch`]), before the loss:
//!
//! 1. one round per layer, in the order the forward pass reaches them ([`NormPlan`]): the
//!    layer's `Σ(h − m)` and `Σ(h − m)²`, with `m` its running mean (a shift every rank knows,
//!    which keeps the variance's cancellation small), computed with the layers before it
//!    normalised by their global moments;
//! 2. the model's own rounds (free bits), knowing every layer's moments;
//! 3. one round per layer, last layer first: `Σg` and `Σg·x̂`, which are exactly the gradients
//!    of the loss with respect to the layer's β and γ, with the corrections of the layers after
//!    it in place.
//!
//! The loss then adds, for every layer, `Σ_r c_r·h_r` minus the same detached: zero in value,
//! with gradient `c_r = −γ/σ·(Σg/N + x̂_r·Σ(g·x̂)/N)` (constants of the global batch), which
//! completes what autograd computes with μ and σ held fixed. The price: a forward pass per
//! layer and a forward and backward pass per layer before each step.
//!
//! Running moments (momentum 0.1, unbiased variance, like PyTorch's `BatchNorm1d`) are
//! non-gradient state updated after each step from the moments of the global batch, which ride
//! in the update all-reduce; evaluation, sampling and reconstruction normalise by them.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use crate::buffers::Buffers;
use crate::error::{ModelError, Result};
use crate::layers::{linear, linear_without_bias, Activation, Linear};
use crate::params::Params;

/// ε of the normalisation (PyTorch's default).
pub const EPSILON: f64 = 1e-5;
/// Weight of a step's moments in the running moments (PyTorch's default).
pub const MOMENTUM: f64 = 0.1;

/// One batch-normalised layer of `width` features: parameters `{name}.weight` (γ, from 1)
/// and `{name}.bias` (β, from 0), buffers `{name}.running_mean` and `{name}.running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    name: String,
    /// Where the forward pass reaches it among the model's layers (0 = first).
    slot: usize,
    width: usize,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    /// A layer named `name`, the `slot`-th the forward pass reaches.
    pub fn new(
        params: &mut Params,
        buffers: &mut Buffers,
        name: &str,
        width: usize,
        slot: usize,
    ) -> Result<Self> {
        Ok(BatchNorm {
            name: name.to_string(),
            slot,
            width,
            gamma: params.constant(&format!("{name}.weight"), &[width], 1.0)?,
            beta: params.constant(&format!("{name}.bias"), &[width], 0.0)?,
            running_mean: buffers.declare(
                &format!("{name}.running_mean"),
                &[width],
                vec![0.0; width],
            )?,
            running_var: buffers.declare(
                &format!("{name}.running_var"),
                &[width],
                vec![1.0; width],
            )?,
        })
    }

    /// Normalised by the running moments.
    fn eval(&self, h: &Tensor) -> Result<Tensor> {
        let scale = (self.running_var.affine(1.0, EPSILON)?.sqrt()?.recip()? * &self.gamma)?;
        let centred = h.broadcast_sub(&self.running_mean.unsqueeze(0)?)?;
        Ok(centred
            .broadcast_mul(&scale.unsqueeze(0)?)?
            .broadcast_add(&self.beta.unsqueeze(0)?)?)
    }
}

/// Dense layers each followed by batch norm and an activation, the last one optionally plain
/// (no norm, no activation: an output layer). A normalised layer has no bias: β is its bias.
#[derive(Debug, Clone)]
pub struct NormedMlp {
    layers: Vec<Linear>,
    norms: Vec<BatchNorm>,
    activation: Activation,
}

impl NormedMlp {
    /// Layers `sizes[0] → sizes[1] → …` named `{name}.{i}`, their norms `{name}.{i}.norm`,
    /// taking slots from `first_slot` on; the last layer normalised and activated if
    /// `normalise_last`.
    pub fn new(
        params: &mut Params,
        buffers: &mut Buffers,
        name: &str,
        sizes: &[usize],
        activation: Activation,
        normalise_last: bool,
        first_slot: usize,
    ) -> Result<Self> {
        let n = sizes.len().saturating_sub(1);
        let normed = if normalise_last {
            n
        } else {
            n.saturating_sub(1)
        };
        let mut layers = Vec::with_capacity(n);
        let mut norms = Vec::with_capacity(normed);
        for (i, w) in sizes.windows(2).enumerate() {
            let layer = format!("{name}.{i}");
            if i < normed {
                layers.push(linear_without_bias(params, &layer, w[0], w[1])?);
                let norm = format!("{layer}.norm");
                norms.push(BatchNorm::new(
                    params,
                    buffers,
                    &norm,
                    w[1],
                    first_slot + i,
                )?);
            } else {
                layers.push(linear(params, &layer, w[0], w[1])?);
            }
        }
        Ok(NormedMlp {
            layers,
            norms,
            activation,
        })
    }

    /// Its norms, first layer first.
    pub fn norms(&self) -> &[BatchNorm] {
        &self.norms
    }

    /// Applies the layers, normalising as `norming` says.
    pub fn forward(&self, x: &Tensor, norming: &Norming) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if let Some(norm) = self.norms.get(i) {
                h = self.activation.apply(&norming.apply(norm, &h)?)?;
            }
        }
        Ok(h)
    }
}

/// What a round of batch statistics computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// The moments of the layer in this slot.
    Moments(usize),
    /// The model's own round of this index.
    Own(usize),
    /// `Σg` and `Σg·x̂` of the layer in this slot.
    Gradients(usize),
}

/// The batch-norm layers of a model, by slot, and the rounds of batch statistics they need
/// around the model's own.
#[derive(Debug, Clone)]
pub struct Norms {
    layers: Vec<BatchNorm>,
    own: Vec<usize>,
}

/// The moments of one layer in one step: `μ` and `1/σ` as (1, width) rows.
#[derive(Debug, Clone)]
struct Moments {
    mean: Tensor,
    inv_std: Tensor,
}

/// What a training pass's layers do, and what they leave behind.
#[derive(Debug)]
enum Mode {
    /// Normalise by the running moments.
    Eval,
    /// Normalise by the global batch's moments where known (by slot), and keep what the
    /// step's rounds need; a layer whose moments are not known yet (its round, or later) keeps
    /// its shifted sums and passes h on unnormalised (what follows it is not used). Layers up
    /// to slot `detached` read h without its graph: a gradient round needs the gradients of one
    /// layer's γ and β only, which never flow back through the layers before it.
    Train {
        moments: Vec<Option<Moments>>,
        detached: Option<usize>,
    },
}

/// What a normalised layer kept in a training pass.
#[derive(Debug, Clone)]
enum Kept {
    /// Its input h (with its graph), x̂ and 1/σ (detached).
    Normalised {
        h: Tensor,
        x_hat: Tensor,
        inv_std: Tensor,
    },
    /// `[Σ(h − m), Σ(h − m)²]` of this rank's rows (its moments were not known).
    Sums(Tensor),
}

/// How the batch-norm layers of one forward pass normalise.
#[derive(Debug)]
pub struct Norming {
    mode: Mode,
    kept: RefCell<BTreeMap<usize, Kept>>,
}

impl Norming {
    /// Normalise by the running moments (evaluation, sampling, reconstruction).
    pub fn eval() -> Self {
        Norming {
            mode: Mode::Eval,
            kept: RefCell::new(BTreeMap::new()),
        }
    }

    /// Normalises `h` by `norm` (the model's layer): (B, width).
    pub fn apply(&self, norm: &BatchNorm, h: &Tensor) -> Result<Tensor> {
        let Mode::Train { moments, detached } = &self.mode else {
            return norm.eval(h);
        };
        let known = match moments.get(norm.slot).and_then(Option::as_ref) {
            None => {
                let shifted = h.detach().broadcast_sub(&norm.running_mean.unsqueeze(0)?)?;
                let sums = Tensor::cat(&[shifted.sum(0)?, shifted.sqr()?.sum(0)?], 0)?;
                self.kept.borrow_mut().insert(norm.slot, Kept::Sums(sums));
                return Ok(h.clone());
            }
            Some(m) => m,
        };
        let h = match detached {
            Some(last) if norm.slot <= *last => h.detach(),
            _ => h.clone(),
        };
        let x_hat = h
            .broadcast_sub(&known.mean)?
            .broadcast_mul(&known.inv_std)?;
        self.kept.borrow_mut().insert(
            norm.slot,
            Kept::Normalised {
                h,
                x_hat: x_hat.detach(),
                inv_std: known.inv_std.clone(),
            },
        );
        Ok(x_hat
            .broadcast_mul(&norm.gamma.unsqueeze(0)?)?
            .broadcast_add(&norm.beta.unsqueeze(0)?)?)
    }

    fn kept(&self, slot: usize) -> Result<Kept> {
        self.kept.borrow().get(&slot).cloned().ok_or_else(|| {
            ModelError::Spec(format!(
                "batch-norm layer {slot} was not reached by the forward pass"
            ))
        })
    }
}

impl Norms {
    /// The norms of a model (any order; their slots must be 0..n, each once) and the lengths
    /// of the model's own rounds of batch statistics.
    pub fn new(mut layers: Vec<BatchNorm>, own: Vec<usize>) -> Result<Self> {
        layers.sort_by_key(|l| l.slot);
        if layers.iter().enumerate().any(|(i, l)| l.slot != i) {
            return Err(ModelError::Spec(format!(
                "batch-norm slots {:?}, expected 0 to {} each once",
                layers.iter().map(|l| l.slot).collect::<Vec<_>>(),
                layers.len().saturating_sub(1)
            )));
        }
        Ok(Norms { layers, own })
    }

    /// The rounds of batch statistics: the moments of every layer, the model's own, then the
    /// gradient sums of every layer, last first.
    pub fn rounds(&self) -> Vec<usize> {
        let moments = self.layers.iter().map(|l| 2 * l.width);
        moments
            .clone()
            .chain(self.own.iter().copied())
            .chain(moments.rev())
            .collect()
    }

    /// What round `round` computes.
    pub fn round(&self, round: usize) -> Result<Round> {
        let (n, own) = (self.layers.len(), self.own.len());
        match round {
            r if r < n => Ok(Round::Moments(r)),
            r if r < n + own => Ok(Round::Own(r - n)),
            r if r < 2 * n + own => Ok(Round::Gradients(2 * n + own - 1 - r)),
            r => Err(ModelError::Input(format!(
                "batch-statistics round {r}, expected below {}",
                2 * n + own
            ))),
        }
    }

    /// The global sums of the model's own rounds in `stats` (every round's sums, in order, as
    /// far as they are known): empty until they are all known.
    pub fn own_stats<'a>(&self, stats: &'a [f32]) -> &'a [f32] {
        let at: usize = self.layers.iter().map(|l| 2 * l.width).sum();
        let len: usize = self.own.iter().sum();
        stats.get(at..at + len).unwrap_or(&[])
    }

    /// A training pass normalising by the global moments `stats` holds (`rows` rows in the
    /// global batch).
    pub fn training(&self, stats: &[f32], rows: u64) -> Result<Norming> {
        self.pass(stats, rows, None)
    }

    /// The training pass of the gradient round of the layer in `slot` ([`Norms::gradient_sums`]):
    /// the layers up to it read their input without its graph, so that the backward pass stops
    /// there.
    pub fn gradient_pass(&self, stats: &[f32], rows: u64, slot: usize) -> Result<Norming> {
        self.pass(stats, rows, Some(slot))
    }

    fn pass(&self, stats: &[f32], rows: u64, detached: Option<usize>) -> Result<Norming> {
        let n = rows.max(1) as f64;
        let mut at = 0;
        let mut moments = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let w = layer.width;
            let Some(sums) = stats.get(at..at + 2 * w) else {
                break;
            };
            at += 2 * w;
            let shift = layer.running_mean.to_vec1::<f32>()?;
            let (mut mean, mut inv_std) = (Vec::with_capacity(w), Vec::with_capacity(w));
            for j in 0..w {
                let m = f64::from(sums[j]) / n;
                let var = (f64::from(sums[w + j]) / n - m * m).max(0.0);
                mean.push((f64::from(shift[j]) + m) as f32);
                inv_std.push((1.0 / (var + EPSILON).sqrt()) as f32);
            }
            let device = layer.gamma.device();
            moments.push(Some(Moments {
                mean: Tensor::from_vec(mean, (1, w), device)?,
                inv_std: Tensor::from_vec(inv_std, (1, w), device)?,
            }));
        }
        moments.resize(self.layers.len(), None);
        Ok(Norming {
            mode: Mode::Train { moments, detached },
            kept: RefCell::new(BTreeMap::new()),
        })
    }

    /// The moment sums of the layer in `slot` that a training pass kept (a moments round).
    pub fn moment_sums(&self, norming: &Norming, slot: usize) -> Result<Tensor> {
        match norming.kept(slot)? {
            Kept::Sums(s) => Ok(s),
            Kept::Normalised { .. } => Err(ModelError::Spec(format!(
                "batch-norm layer {slot}'s moments were already known"
            ))),
        }
    }

    /// `[Σg, Σg·x̂]` of the layer in `slot` over this rank's rows: the gradients of `loss` (a
    /// [`Norms::gradient_pass`]'s, with every layer's moments known) with respect to its β and
    /// γ, with the corrections of the layers after it, whose gradient sums `stats` holds, in
    /// place.
    pub fn gradient_sums(
        &self,
        params: &Params,
        norming: &Norming,
        loss: &Tensor,
        stats: &[f32],
        rows: u64,
        slot: usize,
    ) -> Result<Tensor> {
        let loss = (loss + self.corrections(norming, stats, rows, slot + 1)?)?;
        let layer = &self.layers[slot];
        // A backward pass of its own as far as fused layers' gradient slots are concerned.
        params.grad_sink().begin_step();
        let grads: GradStore = loss.backward()?;
        let of = |t: &Tensor| -> Result<Tensor> {
            Ok(match grads.get(t) {
                Some(g) => g.clone(),
                None => t.zeros_like()?,
            })
        };
        Ok(Tensor::cat(&[of(&layer.beta)?, of(&layer.gamma)?], 0)?)
    }

    /// `loss` with every layer's correction: the step's loss (every round's sums in `stats`).
    pub fn complete(
        &self,
        norming: &Norming,
        loss: &Tensor,
        stats: &[f32],
        rows: u64,
    ) -> Result<Tensor> {
        Ok((loss + self.corrections(norming, stats, rows, 0)?)?)
    }

    /// The corrections of the layers from slot `from` on: a scalar of value zero.
    fn corrections(
        &self,
        norming: &Norming,
        stats: &[f32],
        rows: u64,
        from: usize,
    ) -> Result<Tensor> {
        let n = rows.max(1) as f64;
        let moments_len: usize = self.layers.iter().map(|l| 2 * l.width).sum();
        let mut at = moments_len + self.own.iter().sum::<usize>();
        let mut total: Option<Tensor> = None;
        for layer in self.layers.iter().rev() {
            let w = layer.width;
            if layer.slot < from {
                break;
            }
            let sums = stats.get(at..at + 2 * w).ok_or_else(|| {
                ModelError::Input(format!(
                    "batch norm {} needs its gradient sums, which the statistics lack",
                    layer.name
                ))
            })?;
            at += 2 * w;
            let Kept::Normalised { h, x_hat, inv_std } = norming.kept(layer.slot)? else {
                return Err(ModelError::Spec(format!(
                    "batch norm {} was not normalised by the global moments",
                    layer.name
                )));
            };
            let device = h.device();
            let mean_g = (Tensor::from_slice(&sums[..w], (1, w), device)? / n)?;
            let mean_gx = (Tensor::from_slice(&sums[w..], (1, w), device)? / n)?;
            let scale = inv_std
                .broadcast_mul(&layer.gamma.detach().unsqueeze(0)?)?
                .neg()?;
            let c = x_hat
                .broadcast_mul(&mean_gx)?
                .broadcast_add(&mean_g)?
                .broadcast_mul(&scale)?;
            let term = (&h * &c)?.sum_all()?;
            let zero = (&term - term.detach())?;
            total = Some(match total {
                None => zero,
                Some(t) => (t + zero)?,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Ok(Tensor::new(0f32, &self.device())?),
        }
    }

    /// Length of the update statistics: every layer's moment sums and the row count.
    pub fn update_len(&self) -> usize {
        self.layers.iter().map(|l| 2 * l.width).sum::<usize>() + 1
    }

    /// The update statistics of this rank's rows from the step's training pass: every layer's
    /// `[Σ(h − m), Σ(h − m)²]`, then the row count.
    pub fn update_stats(&self, norming: &Norming, rows: usize) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let Kept::Normalised { h, .. } = norming.kept(layer.slot)? else {
                return Err(ModelError::Spec(format!(
                    "batch norm {} was not normalised by the global moments",
                    layer.name
                )));
            };
            let shifted = h
                .detach()
                .broadcast_sub(&layer.running_mean.unsqueeze(0)?)?;
            parts.push(shifted.sum(0)?);
            parts.push(shifted.sqr()?.sum(0)?);
        }
        parts.push(Tensor::new(&[rows as f32], &self.device())?);
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Moves the running moments towards the global batch's (all-reduced update statistics).
    pub fn update_state(&self, buffers: &Buffers, stats: &[f32]) -> Result<()> {
        if stats.len() != self.update_len() {
            return Err(ModelError::Input(format!(
                "batch norm's update holds {} values, expected {}",
                stats.len(),
                self.update_len()
            )));
        }
        let n = f64::from(stats[stats.len() - 1]);
        if n < 1.0 {
            return Ok(());
        }
        let mut at = 0;
        for layer in &self.layers {
            let w = layer.width;
            let (s1, s2) = (&stats[at..at + w], &stats[at + w..at + 2 * w]);
            at += 2 * w;
            let shift = layer.running_mean.to_vec1::<f32>()?;
            let old_var = layer.running_var.to_vec1::<f32>()?;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            let (mut mean, mut var) = (Vec::with_capacity(w), Vec::with_capacity(w));
            for j in 0..w {
                let m = f64::from(s1[j]) / n;
                let v = (f64::from(s2[j]) / n - m * m).max(0.0) * unbias;
                let old = f64::from(shift[j]);
                mean.push((old + MOMENTUM * m) as f32);
                var.push(((1.0 - MOMENTUM) * f64::from(old_var[j]) + MOMENTUM * v) as f32);
            }
            buffers.set(&format!("{}.running_mean", layer.name), &mean)?;
            buffers.set(&format!("{}.running_var", layer.name), &var)?;
        }
        Ok(())
    }

    fn device(&self) -> Device {
        self.layers
            .first()
            .map_or(Device::Cpu, |l| l.gamma.device().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn tensor(rows: usize, cols: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 1.7 + 0.3)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Two batch-normalised layers (tanh) through their rounds give the gradients of batch
    /// norm written out with its moments as functions of the batch (autograd through them).
    #[test]
    fn gradients_equal_batch_norm_through_its_moments() {
        let (rows, sizes) = (6, [4usize, 5, 3]);
        let mut params = Params::new(&Device::Cpu, 3);
        let mut buffers = Buffers::new(&Device::Cpu);
        let mlp = NormedMlp::new(
            &mut params,
            &mut buffers,
            "b",
            &sizes,
            Activation::Tanh,
            true,
            0,
        )
        .unwrap();
        // γ and β away from 1 and 0, so that they count.
        for (name, var) in params.vars() {
            if name.contains(".norm.") {
                let shifted = (var.as_tensor()
                    + tensor(1, var.elem_count(), 7).flatten_all().unwrap() * 0.3)
                    .unwrap();
                var.set(&shifted).unwrap();
            }
        }
        let norms = Norms::new(mlp.norms().to_vec(), Vec::new()).unwrap();
        assert_eq!(norms.rounds(), [10, 6, 6, 10]);
        let x = tensor(rows, sizes[0], 1);
        let target = tensor(rows, sizes[2], 2);
        let loss_of =
            |y: &Tensor| ((y * &target).unwrap().sum_all().unwrap() / rows as f64).unwrap();
        let mut stats: Vec<f32> = Vec::new();
        for round in 0..4 {
            let round = norms.round(round).unwrap();
            let norming = match round {
                Round::Gradients(slot) => norms.gradient_pass(&stats, rows as u64, slot),
                _ => norms.training(&stats, rows as u64),
            }
            .unwrap();
            let y = mlp.forward(&x, &norming).unwrap();
            let sums = match round {
                Round::Moments(slot) => norms.moment_sums(&norming, slot).unwrap(),
                Round::Gradients(slot) => norms
                    .gradient_sums(&params, &norming, &loss_of(&y), &stats, rows as u64, slot)
                    .unwrap(),
                Round::Own(_) => unreachable!("no own rounds"),
            };
            stats.extend(values(&sums));
        }
        let norming = norms.training(&stats, rows as u64).unwrap();
        let y = mlp.forward(&x, &norming).unwrap();
        let loss = norms
            .complete(&norming, &loss_of(&y), &stats, rows as u64)
            .unwrap();
        let exact = loss.backward().unwrap();

        let var = |name: &str| params.vars()[name].as_tensor().clone();
        let mut h = x.clone();
        for i in 0..2 {
            let z = h
                .matmul(&var(&format!("b.{i}.weight")).t().unwrap())
                .unwrap();
            let mean = z.mean_keepdim(0).unwrap();
            let centred = z.broadcast_sub(&mean).unwrap();
            let variance = centred.sqr().unwrap().mean_keepdim(0).unwrap();
            let x_hat = centred
                .broadcast_div(&(variance + EPSILON).unwrap().sqrt().unwrap())
                .unwrap();
            let gamma = var(&format!("b.{i}.norm.weight")).unsqueeze(0).unwrap();
            let beta = var(&format!("b.{i}.norm.bias")).unsqueeze(0).unwrap();
            h = x_hat
                .broadcast_mul(&gamma)
                .unwrap()
                .broadcast_add(&beta)
                .unwrap()
                .tanh()
                .unwrap();
        }
        let reference = loss_of(&h);
        let (a, b) = (
            loss.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        let composed = reference.backward().unwrap();
        for (name, v) in params.vars() {
            let (got, want) = (
                values(exact.get(v.as_tensor()).unwrap()),
                values(composed.get(v.as_tensor()).unwrap()),
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5 + 1e-4 * w.abs(), "{name}: {g} vs {w}");
            }
        }
    }
}
