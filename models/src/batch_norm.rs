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
//! 1. one round per layer, in the order the forward pass reaches them (their slots): the
//!    layer's `Σ(h − m)` and `Σ(h − m)²`, with `m` its running mean (a shift every rank knows,
//!    which keeps the variance's cancellation small), computed with the layers before it
//!    normalised by their global moments;
//! 2. the model's own rounds (free bits), knowing every layer's moments;
//! 3. one round per layer, last layer first: `Σg` and `Σg·x̂`, which are exactly the gradients
//!    of the loss with respect to the layer's β and γ once the layers after it have their
//!    corrections in place.
//!
//! The rounds of step 3 and the loss share **one backward pass, taken in segments** between
//! the layers ([`Norms::gradient_sums`], [`Norms::finish`]). The training pass (every layer's
//! moments known) normalises each layer's input `h` as a leaf, its *cut*. The first gradient
//! round runs the backward pass from the loss down to the cuts; each later round, knowing the
//! global sums of the layer above, completes that layer's gradient at its cut with batch
//! norm's correction `c_r = −γ/σ·(Σg/N + x̂_r·Σ(g·x̂)/N)` (constants of the global batch; one
//! pass over the rows on CPU) and carries it on from `h` down to the cuts below, from a root
//! whose gradient at `h` is that gradient; the loss, knowing the lowest layer's sums, carries
//! the last segment down to the input. Every node of the graph is differentiated once.
//! Each layer's input, computed with the layers before it normalised, is computed once a step
//! and shared, with its cut and (once its moments are known) its output, by the later rounds
//! and the training pass ([`Norming::input`]), and so is what the model computes from an
//! output alone through [`Norming::reuse`] (the ladder's posterior heads). A moments round's
//! forward pass stops at the layer it measures ([`Norms::measure`]), so a step costs one
//! training pass, one backward pass, and per layer only what lies between the kept tensors
//! before it (the ladder's sampling, say). The layers' weight gradients go to the gradient
//! sink like every dense layer's. The ladder's batch-normalised step took 2.2–2.6× the plain
//! one when each round ran on to the model's output, 1.6–1.9× once it stopped at its layer,
//! and 1.3–1.5× with the posterior heads kept (README).
//! What a step's rounds computed waits in the model between its calls (keyed by the step and
//! the batch's tensor); the loss hands the summed gradients to the trainer in the gradient sink
//! when it is on (CPU), else as the gradient of a surrogate (`Σ θ·G` minus the same detached,
//! zero in value).
//!
//! Running moments (momentum 0.1, unbiased variance, like PyTorch's `BatchNorm1d`) are
//! non-gradient state updated after each step from the moments of the global batch, which ride
//! in the update all-reduce; evaluation, sampling and reconstruction normalise by them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{Device, Tensor, TensorId, Var};

use crate::buffers::Buffers;
use crate::cpu::cpu_flat;
use crate::error::{ModelError, Result};
use crate::layers::{linear, linear_without_bias, Activation, Linear};
use crate::model::LossOutput;
use crate::normalise::{completed, normalise, seeded};
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

    /// Applies the layers, normalising as `norming` says (a normalised layer's input that an
    /// earlier round of the step computed is not computed again).
    pub fn forward(&self, x: &Tensor, norming: &Norming) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = match self.norms.get(i) {
                Some(norm) => {
                    let input = match norming.input(norm.slot) {
                        Some(input) => input,
                        None => layer.forward(&h)?,
                    };
                    norming.apply(norm, &input, self.activation)?
                }
                None => layer.forward(&h)?,
            };
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

/// What a training pass's layers do.
#[derive(Debug)]
enum Mode {
    /// Normalise by the running moments.
    Eval,
    /// Normalise by the global batch's moments where known (by slot), each layer's input read
    /// through a cut (a leaf, so that the backward pass stops there); in a moments round the
    /// layer in slot `measuring` keeps its shifted sums and the pass stops there
    /// ([`ModelError::Measured`]). A pass of step and batch `key`.
    Train {
        moments: Vec<Option<Moments>>,
        measuring: Option<usize>,
        key: (u64, TensorId),
    },
}

/// How the batch-norm layers of one forward pass normalise.
#[derive(Debug)]
pub struct Norming {
    mode: Mode,
    /// The step's inputs of the layers so far (see [`LayerInput`]).
    inputs: RefCell<Inputs>,
    /// The shifted sums of the layer in slot `measuring` (a moments round), once reached.
    sums: RefCell<Option<Tensor>>,
}

/// A normalised layer's input h in one step, computed once with every layer before it
/// normalised by the global moments, the cut standing for it and, once its moments are known,
/// its output: the same tensors in every round and in the training pass, so that each is
/// computed once a step and the training pass's graph runs through the cuts it keeps.
#[derive(Debug, Clone)]
struct LayerInput {
    h: Tensor,
    cut: Tensor,
    output: Option<Tensor>,
    /// What the model computed from the output alone, by name ([`Norming::reuse`]).
    derived: BTreeMap<&'static str, Vec<Tensor>>,
}

/// The step's [`LayerInput`]s, by slot.
type Inputs = BTreeMap<usize, LayerInput>;

impl Norming {
    /// Normalise by the running moments (evaluation, sampling, reconstruction).
    pub fn eval() -> Self {
        Norming {
            mode: Mode::Eval,
            inputs: RefCell::new(BTreeMap::new()),
            sums: RefCell::new(None),
        }
    }

    /// The input of the layer in `slot` if an earlier round of the step computed it.
    fn input(&self, slot: usize) -> Option<Tensor> {
        self.inputs.borrow().get(&slot).map(|i| i.h.clone())
    }

    /// Normalises `h` by `norm` (the model's layer) and applies `activation`: (B, width).
    pub fn apply(&self, norm: &BatchNorm, h: &Tensor, activation: Activation) -> Result<Tensor> {
        let Mode::Train {
            moments, measuring, ..
        } = &self.mode
        else {
            return activation.apply(&norm.eval(h)?);
        };
        // h is this step's input of the layer if every layer before it was normalised.
        if norm.slot <= measuring.unwrap_or(usize::MAX)
            && !self.inputs.borrow().contains_key(&norm.slot)
        {
            let cut = Var::from_tensor(&h.detach())?.as_tensor().clone();
            let input = LayerInput {
                h: h.clone(),
                cut,
                output: None,
                derived: BTreeMap::new(),
            };
            self.inputs.borrow_mut().insert(norm.slot, input);
        }
        let Some(known) = moments.get(norm.slot).and_then(Option::as_ref) else {
            return Err(match *measuring {
                Some(slot) if slot == norm.slot => {
                    *self.sums.borrow_mut() = Some(shifted_sums(&h.detach(), &norm.running_mean)?);
                    ModelError::Measured(slot)
                }
                Some(slot) => ModelError::Spec(format!(
                    "batch-norm layer {} was reached before layer {slot}, whose moments round \
                     this is: the slots must follow the order the forward pass reaches the layers",
                    norm.slot
                )),
                // Every layer's moments are known in a pass that measures none.
                None => ModelError::Spec(format!(
                    "batch-norm layer {} is not among the model's norms (slots 0 to {})",
                    norm.slot,
                    moments.len().saturating_sub(1)
                )),
            });
        };
        let mut inputs = self.inputs.borrow_mut();
        let input = inputs.get_mut(&norm.slot).ok_or_else(|| {
            ModelError::Spec(format!("batch-norm layer {} has no input", norm.slot))
        })?;
        if let Some(y) = &input.output {
            return Ok(y.clone());
        }
        let y = normalise(
            &input.cut,
            (&known.mean, &known.inv_std),
            (&known.values.0, &known.values.1),
            (&norm.gamma, &norm.beta),
            activation,
        )?;
        input.output = Some(y.clone());
        Ok(y)
    }

    /// `f()`, computed once a step where `output` is a batch-normalised layer's output in a
    /// training pass: that output is the same tensor in every round of the step and in its
    /// training pass, and so is what `f` computes from it when `f` reads nothing but `output`
    /// and the parameters (the ladder's posterior heads over a block, which each moments round
    /// after it would otherwise compute again). `name` tells apart what different calls compute
    /// from the same output. Elsewhere (evaluation, the output of a layer that is not
    /// normalised) `f` runs every time.
    pub fn reuse<const N: usize>(
        &self,
        output: &Tensor,
        name: &'static str,
        f: impl FnOnce() -> Result<[Tensor; N]>,
    ) -> Result<[Tensor; N]> {
        let slot = self.inputs.borrow().iter().find_map(|(slot, input)| {
            input
                .output
                .as_ref()
                .is_some_and(|y| y.id() == output.id())
                .then_some(*slot)
        });
        let Some(slot) = slot else {
            return f();
        };
        let kept = self
            .inputs
            .borrow()
            .get(&slot)
            .and_then(|input| input.derived.get(name).cloned());
        if let Some(kept) = kept {
            return <[Tensor; N]>::try_from(kept).map_err(|kept| {
                ModelError::Spec(format!(
                    "{name} over batch-norm layer {slot} was kept as {} tensors, asked for as {N}",
                    kept.len()
                ))
            });
        }
        // `f` may normalise layers of its own: the inputs are not borrowed while it runs.
        let computed = f()?;
        if let Some(input) = self.inputs.borrow_mut().get_mut(&slot) {
            input.derived.insert(name, computed.to_vec());
        }
        Ok(computed)
    }

    /// The layer in `slot`, normalised by the global moments in this pass: its input h, its
    /// cut and its moments.
    fn normalised(&self, slot: usize) -> Result<(Tensor, Tensor, Moments)> {
        let moments = match &self.mode {
            Mode::Train { moments, .. } => moments.get(slot).and_then(Option::as_ref),
            Mode::Eval => None,
        };
        match (self.inputs.borrow().get(&slot), moments) {
            (
                Some(LayerInput {
                    h,
                    cut,
                    output: Some(_),
                    ..
                }),
                Some(m),
            ) => Ok((h.clone(), cut.clone(), m.clone())),
            _ => Err(ModelError::Spec(format!(
                "batch-norm layer {slot} was not normalised by the global moments"
            ))),
        }
    }
}

/// The batch-norm layers of a model, by slot, the rounds of batch statistics they need
/// around the model's own, and the steps under way.
#[derive(Debug)]
pub struct Norms {
    layers: Vec<BatchNorm>,
    own: Vec<usize>,
    under_way: Mutex<Vec<UnderWay>>,
}

/// What one step's rounds leave for the next ones and the loss: the layers' inputs, this
/// rank's moment sums of each layer (its update statistics), and the backward pass once it has
/// begun. Keyed by the step and the batch's tensor; only the current step's wait (other ranks'
/// in a test, or one a halt abandoned).
#[derive(Debug)]
struct UnderWay {
    step: u64,
    batch: TensorId,
    inputs: Inputs,
    sums: BTreeMap<usize, Tensor>,
    backward: Option<Segments>,
}

/// The moments of one layer in one step: `μ` and `1/σ` as (1, width) rows.
#[derive(Debug, Clone)]
struct Moments {
    mean: Tensor,
    inv_std: Tensor,
    /// Their values.
    values: (Vec<f32>, Vec<f32>),
}

/// One step's backward pass between its gradient rounds (see the module's documentation).
#[derive(Debug)]
struct Segments {
    /// The training pass, every layer's moments known.
    norming: Norming,
    /// What the model's objective returned for it.
    output: LossOutput,
    /// The gradients so far: of the parameters, by name, and at each layer's cut, by slot.
    params: BTreeMap<String, Tensor>,
    cuts: BTreeMap<usize, Tensor>,
    /// The layer whose segment (from its input down) runs next, once its sums are known.
    next: usize,
    /// The gradient sink's pass the step's deposits count for.
    sink_pass: u64,
}

impl Norms {
    /// The norms of a model (any order; their slots must be 0..n, each once, at least one)
    /// and the lengths of the model's own rounds of batch statistics.
    pub fn new(mut layers: Vec<BatchNorm>, own: Vec<usize>) -> Result<Self> {
        layers.sort_by_key(|l| l.slot);
        if layers.is_empty() || layers.iter().enumerate().any(|(i, l)| l.slot != i) {
            return Err(ModelError::Spec(format!(
                "batch-norm slots {:?}, expected 0 to n − 1 each once, n ≥ 1",
                layers.iter().map(|l| l.slot).collect::<Vec<_>>(),
            )));
        }
        Ok(Norms {
            layers,
            own,
            under_way: Mutex::new(Vec::new()),
        })
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

    /// Where round `round`'s sums start in the statistics of a step.
    fn round_start(&self, round: usize) -> usize {
        self.rounds().iter().take(round).sum()
    }

    /// The global sums of the model's own rounds in `stats` (every round's sums, in order, as
    /// far as they are known): empty until they are all known.
    pub fn own_stats<'a>(&self, stats: &'a [f32]) -> &'a [f32] {
        let at = self.round_start(self.layers.len());
        let len: usize = self.own.iter().sum();
        stats.get(at..at + len).unwrap_or(&[])
    }

    /// Runs `f` on what step `step` on `batch` (this rank's input tensor) left so far, starting
    /// it if there is none (and dropping what other steps left).
    fn under_way<R>(
        &self,
        (step, batch): (u64, TensorId),
        f: impl FnOnce(&mut UnderWay) -> R,
    ) -> R {
        let mut under_way = self.under_way.lock().expect("batch-norm steps lock");
        let at = match under_way
            .iter()
            .position(|u| (u.step, u.batch) == (step, batch))
        {
            Some(at) => at,
            None => {
                under_way.retain(|u| u.step == step);
                under_way.push(UnderWay {
                    step,
                    batch,
                    inputs: BTreeMap::new(),
                    sums: BTreeMap::new(),
                    backward: None,
                });
                under_way.len() - 1
            }
        };
        f(&mut under_way[at])
    }

    /// A training pass of step `step` on `batch` (this rank's input tensor) normalising by the
    /// global moments `stats` holds (`rows` rows in the global batch), every layer's moments
    /// known or the first unknown one's sums kept (a moments round); the layers' inputs that
    /// the step's earlier rounds computed are not computed again.
    pub fn training(
        &self,
        stats: &[f32],
        rows: u64,
        (step, batch): (u64, &Tensor),
    ) -> Result<Norming> {
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
                mean: Tensor::from_slice(&mean, (1, w), device)?,
                inv_std: Tensor::from_slice(&inv_std, (1, w), device)?,
                values: (mean, inv_std),
            }));
        }
        let measuring = (moments.len() < self.layers.len()).then_some(moments.len());
        moments.resize(self.layers.len(), None);
        let key = (step, batch.id());
        let inputs = self.under_way(key, |u| u.inputs.clone());
        Ok(Norming {
            mode: Mode::Train {
                moments,
                measuring,
                key,
            },
            inputs: RefCell::new(inputs),
            sums: RefCell::new(None),
        })
    }

    /// The moments round of the layer in `slot`: runs `forward`, the model's forward pass with
    /// the training pass `norming` (from [`Norms::training`] with every earlier layer's
    /// moments), which stops where it reaches that layer ([`ModelError::Measured`]: nothing
    /// after it is computed), and returns the layer's shifted sums on this rank's rows. They
    /// and the layers' inputs the pass computed wait for the step's next rounds and its loss.
    pub fn measure(
        &self,
        norming: &Norming,
        slot: usize,
        forward: impl FnOnce() -> Result<()>,
    ) -> Result<Tensor> {
        match forward() {
            Ok(()) => {}
            Err(ModelError::Measured(reached)) if reached == slot => {}
            Err(ModelError::Measured(reached)) => {
                return Err(ModelError::Spec(format!(
                    "the moments round of batch-norm layer {slot} was handed the training pass \
                     of layer {reached}'s"
                )))
            }
            Err(e) => return Err(e),
        }
        self.moment_sums(norming, slot)
    }

    /// The moment sums of the layer in `slot` that a training pass kept (a moments round);
    /// they and the inputs it computed wait for the step's next rounds and its loss.
    fn moment_sums(&self, norming: &Norming, slot: usize) -> Result<Tensor> {
        let Mode::Train { measuring, key, .. } = &norming.mode else {
            return Err(ModelError::Spec(
                "batch-norm moments come from a training pass".into(),
            ));
        };
        let sums = norming
            .sums
            .borrow()
            .clone()
            .filter(|_| *measuring == Some(slot))
            .ok_or_else(|| {
                ModelError::Spec(format!(
                    "batch-norm layer {slot} was not reached by the forward pass of its round"
                ))
            })?;
        self.under_way(*key, |u| {
            u.inputs = norming.inputs.borrow().clone();
            u.sums.insert(slot, sums.clone());
        });
        Ok(sums)
    }

    /// `[Σg, Σg·x̂]` of the layer in `slot` over this rank's rows (the gradient round of
    /// `slot`, `stats` holding every earlier round's global sums): the gradients of the loss
    /// with respect to its β and γ, the layers after it corrected. The round of the last layer
    /// starts the step's backward pass: `pass` runs the model's objective through the training
    /// pass it is given, and its loss is differentiated down to the cuts. Each later round
    /// carries the segment of the layer above it down. `batch` is the step's input tensor.
    pub fn gradient_sums(
        &self,
        params: &Params,
        (step, batch): (u64, &Tensor),
        stats: &[f32],
        rows: u64,
        slot: usize,
        pass: impl FnOnce(&Norming) -> Result<LossOutput>,
    ) -> Result<Tensor> {
        let layer = self.layers.get(slot).ok_or_else(|| {
            ModelError::Input(format!(
                "batch-norm slot {slot}, expected below {}",
                self.layers.len()
            ))
        })?;
        let key = (step, batch.id());
        let segments = if slot + 1 == self.layers.len() {
            let norming = self.training(stats, rows, (step, batch))?;
            let output = pass(&norming)?;
            let sink = params.grad_sink();
            sink.begin_step();
            let mut segments = Segments {
                norming,
                output,
                params: BTreeMap::new(),
                cuts: BTreeMap::new(),
                next: slot,
                sink_pass: sink.current_step(),
            };
            let loss = segments.output.loss.clone();
            self.differentiate(params, &mut segments, &loss)?;
            segments
        } else {
            let mut segments = self.resume(key, slot + 1)?;
            self.carry_down(params, &mut segments, stats, rows)?;
            segments
        };
        let of = |t: &Tensor, part: &str| -> Result<Tensor> {
            Ok(
                match segments.params.get(&format!("{}.{part}", layer.name)) {
                    Some(g) => g.clone(),
                    None => t.zeros_like()?,
                },
            )
        };
        let sums = Tensor::cat(&[of(&layer.beta, "bias")?, of(&layer.gamma, "weight")?], 0)?;
        self.under_way(key, |u| u.backward = Some(segments));
        Ok(sums)
    }

    /// The step's loss, once every gradient round is done: the last segment is carried down
    /// to the input, and the loss returned is the objective's in value whose gradient is the
    /// step's (see the module's documentation), with the update statistics of this rank's
    /// `local_rows` rows. What the step left is let go.
    pub fn finish(
        &self,
        params: &Params,
        (step, batch): (u64, &Tensor),
        stats: &[f32],
        rows: u64,
        local_rows: usize,
    ) -> Result<LossOutput> {
        let key = (step, batch.id());
        let mut segments = self.resume(key, 0)?;
        let moment_sums = self.under_way(key, |u| std::mem::take(&mut u.sums));
        self.under_way
            .lock()
            .expect("batch-norm steps lock")
            .retain(|u| (u.step, u.batch) != key);
        let sink = params.grad_sink();
        // The trainer began a pass of its own before the loss: the rounds' deposits are this
        // step's all the same.
        sink.carry_over(segments.sink_pass);
        self.carry_down(params, &mut segments, stats, rows)?;
        let mut output = segments.output;
        let value = output.loss.detach();
        output.update_stats = Some(self.update_stats(moment_sums, local_rows)?);
        if sink.enabled() && crate::forms::fused_on(params.device()) {
            // The trainer reads the step's gradients from the sink, where fused layers leave
            // theirs on CPU: hand the others over there too, and the loss is its value alone.
            // (On a GPU the surrogate keeps them on the device.)
            for (name, g) in &segments.params {
                let g = g.contiguous()?;
                let values = cpu_flat(&g)?;
                let values = values.values()?;
                sink.deposit(name, |dst, current| {
                    if current {
                        dst.iter_mut().zip(values).for_each(|(d, v)| *d += v);
                    } else {
                        dst.copy_from_slice(values);
                    }
                })
                .ok_or_else(|| {
                    ModelError::Spec(format!("the gradient sink has no slot for {name}"))
                })?;
            }
            output.loss = value;
            return Ok(output);
        }
        let mut surrogate: Option<Tensor> = None;
        for (name, var) in params.vars() {
            let Some(g) = segments.params.get(name) else {
                continue;
            };
            let term = (var.as_tensor() * g)?.sum_all()?;
            surrogate = Some(match surrogate {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        output.loss = match surrogate {
            Some(s) => (value + (&s - s.detach())?)?,
            None => value,
        };
        Ok(output)
    }

    /// The step's backward pass, waiting for the segment of the layer in `next`.
    fn resume(&self, key: (u64, TensorId), next: usize) -> Result<Segments> {
        self.under_way(key, |u| match u.backward.take() {
            Some(s) if s.next == next => Ok(s),
            other => {
                u.backward = other;
                Err(ModelError::Spec(format!(
                    "batch norm's backward pass of step {} is not waiting for layer {next}: \
                     the gradient rounds come in order, last layer first, before the loss, on \
                     the same batch",
                    key.0
                )))
            }
        })
    }

    /// Runs the segment of the layer in `segments.next`: its gradient at the cut completed by
    /// batch norm's correction (its global sums in `stats`), carried from its input down.
    fn carry_down(
        &self,
        params: &Params,
        segments: &mut Segments,
        stats: &[f32],
        rows: u64,
    ) -> Result<()> {
        let slot = segments.next;
        let layer = &self.layers[slot];
        let w = layer.width;
        let n = rows.max(1) as f64;
        // Gradient rounds come last layer first, after the moments and the model's own.
        let round = 2 * self.layers.len() + self.own.len() - 1 - slot;
        let at = self.round_start(round);
        let sums = stats.get(at..at + 2 * w).ok_or_else(|| {
            ModelError::Input(format!(
                "batch norm {} needs its gradient sums, which the statistics lack",
                layer.name
            ))
        })?;
        let (h, cut, moments) = segments.norming.normalised(slot)?;
        let mean = |sums: &[f32]| -> Vec<f32> {
            sums.iter().map(|s| (f64::from(*s) / n) as f32).collect()
        };
        let g = completed(
            &cut.detach(),
            segments.cuts.remove(&slot).as_ref(),
            &layer.gamma,
            (&moments.values.0, &moments.values.1),
            (&mean(&sums[..w]), &mean(&sums[w..])),
        )?;
        self.differentiate(params, segments, &seeded(&h, &g)?)?;
        segments.next = slot.saturating_sub(1);
        Ok(())
    }

    /// Differentiates `root` down to the cuts and adds its gradients to the step's (fused
    /// layers add theirs in the gradient sink, where the step's pass began).
    fn differentiate(&self, params: &Params, segments: &mut Segments, root: &Tensor) -> Result<()> {
        let grads = root.backward()?;
        for (name, var) in params.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                add(&mut segments.params, name.clone(), g.clone())?;
            }
        }
        let cuts: Vec<(usize, Tensor)> = segments
            .norming
            .inputs
            .borrow()
            .iter()
            .filter_map(|(slot, input)| Some((*slot, grads.get(&input.cut)?.clone())))
            .collect();
        for (slot, g) in cuts {
            add(&mut segments.cuts, slot, g)?;
        }
        Ok(())
    }

    /// Length of the update statistics: every layer's moment sums and the row count.
    pub fn update_len(&self) -> usize {
        self.layers.iter().map(|l| 2 * l.width).sum::<usize>() + 1
    }

    /// The update statistics of this rank's rows: every layer's `[Σ(h − m), Σ(h − m)²]` (its
    /// moments round's, `sums` by slot: the inputs the training pass normalised), then the row
    /// count.
    fn update_stats(&self, mut sums: BTreeMap<usize, Tensor>, rows: usize) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            parts.push(sums.remove(&layer.slot).ok_or_else(|| {
                ModelError::Spec(format!(
                    "batch norm {} had no moments round in this step",
                    layer.name
                ))
            })?);
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

/// `[Σ(h − m), Σ(h − m)²]` over the rows of `h` (B, width), `m` the running mean: sums as
/// products with a row of ones (a gemm; candle's column sums are strided loops).
fn shifted_sums(h: &Tensor, running_mean: &Tensor) -> Result<Tensor> {
    let shifted = h.broadcast_sub(&running_mean.unsqueeze(0)?)?;
    let both = Tensor::cat(&[&shifted, &shifted.sqr()?], 1)?;
    let ones = Tensor::ones((1, h.dim(0)?), h.dtype(), h.device())?;
    Ok(ones.matmul(&both)?.squeeze(0)?)
}

/// Adds `g` to the gradient of `key` in `into`.
fn add<K: Ord>(into: &mut BTreeMap<K, Tensor>, key: K, g: Tensor) -> Result<()> {
    let sum = match into.remove(&key) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    into.insert(key, sum);
    Ok(())
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
        let output = |y: &Tensor| LossOutput {
            loss: loss_of(y),
            terms: BTreeMap::new(),
            update_stats: None,
        };
        let mut stats: Vec<f32> = Vec::new();
        for round in 0..4 {
            let sums = match norms.round(round).unwrap() {
                Round::Moments(slot) => {
                    let norming = norms.training(&stats, rows as u64, (0, &x)).unwrap();
                    norms
                        .measure(&norming, slot, || mlp.forward(&x, &norming).map(drop))
                        .unwrap()
                }
                Round::Gradients(slot) => norms
                    .gradient_sums(&params, (0, &x), &stats, rows as u64, slot, |norming| {
                        Ok(output(&mlp.forward(&x, norming)?))
                    })
                    .unwrap(),
                Round::Own(_) => unreachable!("no own rounds"),
            };
            stats.extend(values(&sums));
        }
        let loss = norms
            .finish(&params, (0, &x), &stats, rows as u64, rows)
            .unwrap()
            .loss;
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

    /// Two batch-normalised blocks, `a` reached first by the forward pass: their slots are
    /// `first_a` and `first_b` (one layer each, then a plain output layer).
    fn two_blocks(first_a: usize, first_b: usize) -> (Params, NormedMlp, NormedMlp, Norms) {
        let mut params = Params::new(&Device::Cpu, 5);
        let mut buffers = Buffers::new(&Device::Cpu);
        let mut block = |name: &str, first: usize| {
            let sizes = [3usize, 4, 3];
            NormedMlp::new(
                &mut params,
                &mut buffers,
                name,
                &sizes,
                Activation::Relu,
                false,
                first,
            )
            .unwrap()
        };
        let (a, b) = (block("a", first_a), block("b", first_b));
        let norms = Norms::new([a.norms(), b.norms()].concat(), Vec::new()).unwrap();
        (params, a, b, norms)
    }

    /// A moments round's pass ends at the layer it measures: what follows is not run, and the
    /// sums are that layer's input's, shifted by its running mean (0 at the start).
    #[test]
    fn a_moments_round_stops_at_its_layer() {
        let (params, a, b, norms) = two_blocks(0, 1);
        let x = tensor(5, 3, 1);
        let norming = norms.training(&[], 5, (0, &x)).unwrap();
        let mut after = false;
        let sums = norms
            .measure(&norming, 0, || {
                b.forward(&a.forward(&x, &norming)?, &norming)?;
                after = true;
                Ok(())
            })
            .unwrap();
        assert!(!after, "the pass ran on past the measured layer");
        let w = params.vars()["a.0.weight"].as_tensor().clone();
        let h = x.matmul(&w.t().unwrap()).unwrap();
        let want = [
            values(&h.sum(0).unwrap()),
            values(&h.sqr().unwrap().sum(0).unwrap()),
        ]
        .concat();
        for (g, w) in values(&sums).iter().zip(&want) {
            assert!((g - w).abs() < 1e-5 + 1e-5 * w.abs(), "{g} vs {w}");
        }
    }

    /// The error of the moments round of `slot` over blocks `a` then `b` with slots `first_a`
    /// and `first_b`, its training pass made with no moments known (the round of slot 0's).
    fn measure_error(first_a: usize, first_b: usize, slot: usize) -> String {
        let (_, a, b, norms) = two_blocks(first_a, first_b);
        let x = tensor(5, 3, 1);
        let norming = norms.training(&[], 5, (0, &x)).unwrap();
        norms
            .measure(&norming, slot, || {
                b.forward(&a.forward(&x, &norming)?, &norming).map(drop)
            })
            .unwrap_err()
            .to_string()
    }

    /// A layer reached before the one a moments round measures means the slots do not follow
    /// the forward pass: refused, naming both, instead of measuring a layer whose input was
    /// never normalised.
    #[test]
    fn layers_reached_out_of_slot_order_are_refused() {
        let err = measure_error(1, 0, 0);
        assert!(err.contains("layer 1 was reached before layer 0"), "{err}");
    }

    /// A moments round handed the training pass of another layer's round is refused, naming
    /// both, not taken as its own layer's sums.
    #[test]
    fn a_moments_round_refuses_another_layers_pass() {
        let err = measure_error(0, 1, 1);
        assert!(
            err.contains("round of batch-norm layer 1 was handed the training pass of layer 0"),
            "{err}"
        );
    }

    /// What a model computes from a normalised layer's output through [`Norming::reuse`] is
    /// computed once a step: the later moments rounds and the training pass get the very
    /// tensor the first computed; in evaluation, and from a tensor that is no normalised
    /// layer's output, it is computed every time.
    #[test]
    fn what_is_computed_from_a_layers_output_is_computed_once_a_step() {
        let mut params = Params::new(&Device::Cpu, 5);
        let mut buffers = Buffers::new(&Device::Cpu);
        let mut block = |name: &str, sizes: &[usize], first: usize| {
            NormedMlp::new(
                &mut params,
                &mut buffers,
                name,
                sizes,
                Activation::Relu,
                true,
                first,
            )
            .unwrap()
        };
        let (a, b) = (block("a", &[3, 4], 0), block("b", &[4, 2], 1));
        let norms = Norms::new([a.norms(), b.norms()].concat(), Vec::new()).unwrap();
        let x = tensor(5, 3, 1);
        let runs = std::cell::Cell::new(0);
        // The ids of what each pass got, in order.
        let got = RefCell::new(Vec::new());
        let pass = |norming: &Norming| -> Result<()> {
            let y = a.forward(&x, norming)?;
            let [square] = norming.reuse(&y, "square", || {
                runs.set(runs.get() + 1);
                Ok([y.sqr()?])
            })?;
            got.borrow_mut().push(square.id());
            b.forward(&y, norming).map(drop)
        };
        let mut stats: Vec<f32> = Vec::new();
        for slot in 0..2 {
            let norming = norms.training(&stats, 5, (0, &x)).unwrap();
            let sums = norms.measure(&norming, slot, || pass(&norming)).unwrap();
            stats.extend(values(&sums));
        }
        assert_eq!(runs.get(), 1, "computed in the round of the layer after it");
        let training = norms.training(&stats, 5, (0, &x)).unwrap();
        pass(&training).unwrap();
        assert_eq!(runs.get(), 1, "the training pass computed it again");
        let got = got.into_inner();
        assert_eq!(got.len(), 2, "the round of b and the training pass");
        assert_eq!(got[0], got[1], "the training pass got another tensor");
        let y = a.forward(&x, &training).unwrap();
        let err = training
            .reuse(&y, "square", || Ok([y.clone(), y.clone()]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("kept as 1 tensors, asked for as 2"),
            "{err}"
        );
        let other = norming_reuse_runs(&training, &x);
        assert_eq!(other, 2, "a tensor that is no layer's output");
        let eval = Norming::eval();
        let y = a.forward(&x, &eval).unwrap();
        for _ in 0..2 {
            eval.reuse(&y, "square", || {
                runs.set(runs.get() + 1);
                Ok([y.sqr()?])
            })
            .unwrap();
        }
        assert_eq!(runs.get(), 3, "evaluation computes it every time");
    }

    /// How many times `reuse` of `norming` runs its function over `x` (no layer's output) in
    /// two calls.
    fn norming_reuse_runs(norming: &Norming, x: &Tensor) -> usize {
        let mut runs = 0;
        for _ in 0..2 {
            norming
                .reuse(x, "square", || {
                    runs += 1;
                    Ok([x.sqr()?])
                })
                .unwrap();
        }
        runs
    }
}
