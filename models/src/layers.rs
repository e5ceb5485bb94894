//! Building blocks: activations, MLPs and convolutional encoders/decoders for 28, 32 and 64
//! pixel images, initialised like PyTorch's defaults (uniform ±1/√fan_in).

use candle_core::Tensor;

use crate::class_rows::class_rows;
use crate::conv::{conv2d_masked_with_sink, conv2d_with_sink, ConvSpec};
use crate::dense::{dense_bernoulli_nll_with_sink, dense_with_sink, SinkSlots};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::params::Params;

/// Hidden-layer nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
    /// GELU (tanh approximation).
    Gelu,
}

impl Activation {
    /// Applies the nonlinearity.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Gelu => x.gelu()?,
        })
    }
}

/// A dense layer `y = x Wᵀ + b` with parameters `{name}.weight` `(out, in)` and `{name}.bias`;
/// weight-normalised (Salimans & Kingma 2016), `W = g·V/‖V‖` row by row, with parameters
/// `{name}.weight_v` `(out, in)`, `{name}.weight_g` `(out)` and `{name}.bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// W, or V when weight-normalised.
    weight: Tensor,
    bias: Tensor,
    /// g, when weight-normalised.
    scale: Option<Tensor>,
    /// Names of the weight and bias in the gradient sink (built once, shared by every call;
    /// the weight's alone for a layer without a bias parameter); none for a weight-normalised
    /// layer, whose gradients go through autograd.
    sink_slots: Option<SinkSlots>,
}

impl Linear {
    /// The weight W the product uses, and the sink slots its gradient goes to (none when it
    /// is computed from V and g: their gradients flow through autograd).
    fn weight(&self) -> Result<(Tensor, Option<SinkSlots>)> {
        match &self.scale {
            None => Ok((self.weight.clone(), self.sink_slots.clone())),
            Some(g) => {
                let norm = self.weight.sqr()?.sum_keepdim(1)?.sqrt()?;
                let w = self
                    .weight
                    .broadcast_mul(&g.unsqueeze(1)?.broadcast_div(&norm)?)?;
                Ok((w, None))
            }
        }
    }

    fn apply(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (w, sink) = self.weight()?;
        dense_with_sink(x, &w, &self.bias, relu, sink)
    }

    /// `x·Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `relu(x·Wᵀ + b)`, fused.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }
}

/// A new dense layer named `name`, initialised uniform ±1/√inputs like PyTorch's default.
pub fn linear(params: &mut Params, name: &str, inputs: usize, outputs: usize) -> Result<Linear> {
    linear_with_fan_in(params, name, inputs, outputs, inputs)
}

/// A new weight-normalised dense layer named `name`: V drawn like [`linear`]'s W and g set to
/// V's row norms, so that it starts as the same function (PyTorch's `weight_norm` start).
pub fn linear_weight_normed(
    params: &mut Params,
    name: &str,
    inputs: usize,
    outputs: usize,
) -> Result<Linear> {
    let bound = 1.0 / (inputs as f32).sqrt();
    let v = params.uniform(&format!("{name}.weight_v"), &[outputs, inputs], bound)?;
    let norms = v.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    let scale = params.with_values(&format!("{name}.weight_g"), &[outputs], norms)?;
    let bias = params.uniform(&format!("{name}.bias"), &[outputs], bound)?;
    Ok(Linear {
        weight: v,
        bias,
        scale: Some(scale),
        sink_slots: None,
    })
}

/// A new dense layer without a bias (a batch norm's β takes its place): `{name}.weight` only,
/// initialised like [`linear`]'s.
pub fn linear_without_bias(
    params: &mut Params,
    name: &str,
    inputs: usize,
    outputs: usize,
) -> Result<Linear> {
    let bound = 1.0 / (inputs as f32).sqrt();
    let weight = params.uniform(&format!("{name}.weight"), &[outputs, inputs], bound)?;
    let bias = Tensor::zeros(outputs, weight.dtype(), weight.device())?;
    Ok(Linear {
        weight,
        bias,
        scale: None,
        sink_slots: Some(SinkSlots::weight_only(params.grad_sink().clone(), name)),
    })
}

/// [`linear`] initialised uniform ±1/√fan_in.
fn linear_with_fan_in(
    params: &mut Params,
    name: &str,
    inputs: usize,
    outputs: usize,
    fan_in: usize,
) -> Result<Linear> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let weight = params.uniform(&format!("{name}.weight"), &[outputs, inputs], bound)?;
    let bias = params.uniform(&format!("{name}.bias"), &[outputs], bound)?;
    Ok(Linear {
        weight,
        bias,
        scale: None,
        sink_slots: Some(SinkSlots::new(params.grad_sink().clone(), name)),
    })
}

/// Dense layers with an activation between them (and none after the last), the first
/// optionally reading a class beside its input.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Activation,
    /// The first layer's class embedding `(classes, outputs)`: the weight columns that a
    /// one-hot class code appended to the input would multiply, looked up instead.
    class_embedding: Option<Tensor>,
}

impl Mlp {
    /// [`Mlp::new`] of weight-normalised layers ([`linear_weight_normed`]).
    pub fn weight_normed(
        params: &mut Params,
        name: &str,
        sizes: &[usize],
        activation: Activation,
    ) -> Result<Self> {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear_weight_normed(params, &format!("{name}.{i}"), w[0], w[1]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp {
            layers,
            activation,
            class_embedding: None,
        })
    }

    /// Layers `sizes[0] → sizes[1] → …`, named `{name}.{i}`.
    pub fn new(
        params: &mut Params,
        name: &str,
        sizes: &[usize],
        activation: Activation,
    ) -> Result<Self> {
        Mlp::conditional(params, name, sizes, 0, activation)
    }

    /// [`Mlp::new`] whose first layer also reads a class of `classes` (0: none), as if its
    /// one-hot code were appended to the input: parameter `{name}.0.class_embedding`
    /// `(classes, sizes[1])`, the layer initialised like one of `sizes[0] + classes` inputs.
    pub fn conditional(
        params: &mut Params,
        name: &str,
        sizes: &[usize],
        classes: usize,
        activation: Activation,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(sizes.len().saturating_sub(1));
        let mut class_embedding = None;
        for (i, w) in sizes.windows(2).enumerate() {
            let layer = format!("{name}.{i}");
            if i == 0 && classes > 0 {
                let fan_in = w[0] + classes;
                layers.push(linear_with_fan_in(params, &layer, w[0], w[1], fan_in)?);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let name = format!("{layer}.class_embedding");
                class_embedding = Some(params.uniform(&name, &[classes, w[1]], bound)?);
            } else {
                layers.push(linear(params, &layer, w[0], w[1])?);
            }
        }
        Ok(Mlp {
            layers,
            activation,
            class_embedding,
        })
    }

    /// Applies the layers; the activation follows every layer but the last unless
    /// `activate_last`.
    pub fn forward(&self, x: &Tensor, activate_last: bool) -> Result<Tensor> {
        self.forward_rows(x, None, None, activate_last)
    }

    /// [`Mlp::forward`] for output rows that each read row `rows[i]` of `x` (all of them, in
    /// order, without `rows`) and, for a conditional MLP, class `classes[i]` (u32). The first
    /// layer's product runs once per row of `x`, however many output rows read it.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rows: Option<&Tensor>,
        classes: Option<&Tensor>,
        activate_last: bool,
    ) -> Result<Tensor> {
        self.layers_upto(self.layers.len(), x, rows, classes, activate_last)
    }

    /// Each row's Bernoulli NLL of `target` under the MLP's outputs as logits (rows of `x`, a
    /// class each if conditional), the last layer's product fused with the likelihood (see
    /// [`crate::dense_bernoulli_nll`]); `None` for a single conditional layer, which has no
    /// fused form.
    pub fn bernoulli_nll(
        &self,
        x: &Tensor,
        classes: Option<&Tensor>,
        target: &Tensor,
    ) -> Result<Option<Tensor>> {
        let n = self.layers.len();
        if n == 0 || (n == 1 && self.class_embedding.is_some()) {
            return Ok(None);
        }
        let h = self.layers_upto(n - 1, x, None, classes, true)?;
        let last = &self.layers[n - 1];
        let (w, sink) = last.weight()?;
        Ok(Some(dense_bernoulli_nll_with_sink(
            &h, &w, &last.bias, target, sink,
        )?))
    }

    /// The first `upto` layers (see [`Mlp::forward_rows`]), the activation after the last of
    /// them only if `activate_last` or it is not the MLP's last layer.
    fn layers_upto(
        &self,
        upto: usize,
        x: &Tensor,
        rows: Option<&Tensor>,
        classes: Option<&Tensor>,
        activate_last: bool,
    ) -> Result<Tensor> {
        match (&self.class_embedding, classes) {
            (Some(_), None) => {
                return Err(ModelError::Input(
                    "a conditional network needs the class of every row".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ModelError::Input(
                    "an unconditional network was given classes".into(),
                ))
            }
            _ => {}
        }
        let mut h = x.clone();
        for (i, layer) in self.layers[..upto].iter().enumerate() {
            let activate = activate_last || i + 1 < self.layers.len();
            let first = i == 0 && (rows.is_some() || classes.is_some());
            h = match (first, activate, self.activation) {
                (true, _, act) => {
                    let y = layer.forward(&h)?;
                    let relu = activate && act == Activation::Relu;
                    let y = match (&self.class_embedding, classes) {
                        (Some(e), Some(c)) => class_rows(&y, e, rows, c, relu)?,
                        _ => match rows {
                            Some(rows) => y.index_select(rows, 0)?,
                            None => y,
                        },
                    };
                    if activate && !relu {
                        act.apply(&y)?
                    } else {
                        y
                    }
                }
                (false, true, Activation::Relu) => layer.forward_relu(&h)?,
                (false, true, act) => act.apply(&layer.forward(&h)?)?,
                (false, false, _) => layer.forward(&h)?,
            };
        }
        Ok(h)
    }
}

/// Channels of the convolutional stack.
const CONV_CHANNELS: [usize; 3] = [32, 64, 64];

/// Number of stride-2 convolutions for a square image side, and the side they leave.
fn conv_depth(side: usize) -> Result<(usize, usize)> {
    match side {
        28 => Ok((2, 7)),
        32 => Ok((2, 8)),
        64 => Ok((3, 8)),
        other => Err(ModelError::Spec(format!(
            "convolutional encoders take 28, 32 or 64 pixel square images, not {other}"
        ))),
    }
}

/// One convolution of a stack: its parameters, how it moves, its gradient-sink slots.
#[derive(Debug, Clone)]
pub(crate) struct ConvLayer {
    weight: Tensor,
    bias: Tensor,
    spec: ConvSpec,
    sink: SinkSlots,
    /// The kernel offsets a masked convolution reads (`None`: all).
    taps: Option<u128>,
}

impl ConvLayer {
    /// A `kernel`×`kernel` (transposed) convolution `{layer}.weight`/`.bias` moving as `spec`
    /// says, initialised like PyTorch's (uniform ±1/√fan_in; a transposed convolution's fan-in
    /// is its output channels × k², PyTorch's convention).
    fn new(
        params: &mut Params,
        layer: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        spec: ConvSpec,
    ) -> Result<Self> {
        let k2 = kernel * kernel;
        let (shape, fan_in) = if spec.transposed {
            ([cin, cout, kernel, kernel], cout * k2)
        } else {
            ([cout, cin, kernel, kernel], cin * k2)
        };
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weight = params.uniform(&format!("{layer}.weight"), &shape, bound)?;
        let bias = params.uniform(&format!("{layer}.bias"), &[cout], bound)?;
        Ok(ConvLayer {
            weight,
            bias,
            spec,
            sink: SinkSlots::new(params.grad_sink().clone(), layer),
            taps: None,
        })
    }

    /// [`ConvLayer::same`] reading only the kernel offsets of `taps` (bit `ki·k + kj`; see
    /// [`crate::conv2d_masked`]), initialised uniform ±1/√(inputs × kept taps).
    pub(crate) fn masked(
        params: &mut Params,
        layer: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        taps: u128,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * taps.count_ones() as usize) as f32).sqrt();
        Ok(ConvLayer {
            weight: params.uniform(
                &format!("{layer}.weight"),
                &[cout, cin, kernel, kernel],
                bound,
            )?,
            bias: params.uniform(&format!("{layer}.bias"), &[cout], bound)?,
            spec: ConvSpec {
                stride: 1,
                padding: kernel / 2,
                output_padding: 0,
                transposed: false,
            },
            sink: SinkSlots::new(params.grad_sink().clone(), layer),
            taps: Some(taps),
        })
    }

    /// A 4×4, stride-2, padding-1 (transposed) convolution: halves (doubles) the image.
    pub(crate) fn halving(
        params: &mut Params,
        layer: &str,
        cin: usize,
        cout: usize,
        transposed: bool,
    ) -> Result<Self> {
        let spec = ConvSpec {
            stride: 2,
            padding: 1,
            output_padding: 0,
            transposed,
        };
        ConvLayer::new(params, layer, (cin, cout), 4, spec)
    }

    /// A `kernel`×`kernel`, stride-1 convolution that keeps the image's size (odd `kernel`).
    pub(crate) fn same(
        params: &mut Params,
        layer: &str,
        channels: (usize, usize),
        kernel: usize,
    ) -> Result<Self> {
        let spec = ConvSpec {
            stride: 1,
            padding: kernel / 2,
            output_padding: 0,
            transposed: false,
        };
        ConvLayer::new(params, layer, channels, kernel, spec)
    }

    /// The convolution, then `activation` if any (ReLU fused into it on CPU).
    pub(crate) fn forward(&self, x: &Tensor, activation: Option<Activation>) -> Result<Tensor> {
        let sink = Some(self.sink.clone());
        if let Some(taps) = self.taps {
            let y = conv2d_masked_with_sink(x, &self.weight, &self.bias, self.spec, taps, sink)?;
            return match activation {
                Some(act) => act.apply(&y),
                None => Ok(y),
            };
        }
        let fused = activation == Some(Activation::Relu);
        let y = conv2d_with_sink(x, &self.weight, &self.bias, self.spec, fused, sink)?;
        match activation {
            Some(act) if !fused => act.apply(&y),
            _ => Ok(y),
        }
    }
}

/// A residual block of the VQ-VAE recipe (van den Oord et al. 2017; sonnet's and Keras'
/// examples): `x + conv₁ₓ₁(ReLU(conv₃ₓ₃(ReLU(x))))`, the 3×3 convolution from `channels` to
/// `hidden` channels and the 1×1 back, parameters `{name}.conv3` and `{name}.conv1`. Both
/// convolutions are the fused ones (ReLU fused into the 3×3).
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    conv3: ConvLayer,
    conv1: ConvLayer,
}

impl ResidualBlock {
    /// A block over `channels` channels with `hidden` channels inside.
    pub fn new(params: &mut Params, name: &str, channels: usize, hidden: usize) -> Result<Self> {
        if channels == 0 || hidden == 0 {
            return Err(ModelError::Spec(format!(
                "{name}: a residual block needs channels and hidden channels, not {channels} and {hidden}"
            )));
        }
        Ok(ResidualBlock {
            conv3: ConvLayer::same(params, &format!("{name}.conv3"), (channels, hidden), 3)?,
            conv1: ConvLayer::same(params, &format!("{name}.conv1"), (hidden, channels), 1)?,
        })
    }

    /// `(B, C, H, W) → (B, C, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv3.forward(&x.relu()?, Some(Activation::Relu))?;
        Ok((x + self.conv1.forward(&h, None)?)?)
    }
}

/// Stride-2, 4×4 convolutions halving the image, then flattening: `(B, C, S, S) → (B, F)`.
#[derive(Debug, Clone)]
pub struct ConvEncoder {
    convs: Vec<ConvLayer>,
    activation: Activation,
    /// Features after flattening.
    pub features: usize,
}

impl ConvEncoder {
    /// An encoder for `(channels, side, side)` images.
    pub fn new(
        params: &mut Params,
        name: &str,
        channels: usize,
        side: usize,
        activation: Activation,
    ) -> Result<Self> {
        let (depth, last) = conv_depth(side)?;
        let mut convs = Vec::new();
        let mut cin = channels;
        for (i, &cout) in CONV_CHANNELS.iter().take(depth).enumerate() {
            let layer = format!("{name}.conv{i}");
            convs.push(ConvLayer::halving(params, &layer, cin, cout, false)?);
            cin = cout;
        }
        Ok(ConvEncoder {
            convs,
            activation,
            features: cin * last * last,
        })
    }

    /// `(B, C, S, S) → (B, features)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h, Some(self.activation))?;
        }
        Ok(h.flatten_from(1)?)
    }
}

/// The mirror of [`ConvEncoder`]: `(B, F) → (B, C, S, S)` logits/means via 4×4 stride-2
/// transposed convolutions.
#[derive(Debug, Clone)]
pub struct ConvDecoder {
    deconvs: Vec<ConvLayer>,
    activation: Activation,
    start: (usize, usize),
}

impl ConvDecoder {
    /// A decoder for `(channels, side, side)` images; its input has `features` values.
    pub fn new(
        params: &mut Params,
        name: &str,
        channels: usize,
        side: usize,
        activation: Activation,
    ) -> Result<(Self, usize)> {
        let (depth, last) = conv_depth(side)?;
        let chans: Vec<usize> = CONV_CHANNELS
            .iter()
            .take(depth)
            .rev()
            .copied()
            .chain([channels])
            .collect();
        let mut deconvs = Vec::new();
        for (i, pair) in chans.windows(2).enumerate() {
            let layer = format!("{name}.deconv{i}");
            deconvs.push(ConvLayer::halving(params, &layer, pair[0], pair[1], true)?);
        }
        let features = chans[0] * last * last;
        Ok((
            ConvDecoder {
                deconvs,
                activation,
                start: (chans[0], last),
            },
            features,
        ))
    }

    /// `(B, features) → (B, C, S, S)`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (c, s) = self.start;
        let mut h = h.reshape((h.dim(0)?, c, s, s))?;
        let last = self.deconvs.len() - 1;
        for (i, deconv) in self.deconvs.iter().enumerate() {
            h = deconv.forward(&h, (i < last).then_some(self.activation))?;
        }
        Ok(h)
    }
}
