//! Building blocks: activations, MLPs and convolutional encoders/decoders for 28, 32 and 64
//! pixel images, initialised like PyTorch's defaults (uniform ±1/√fan_in).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};

use crate::dense::{dense_with_sink, SinkSlots};
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

/// A dense layer `y = x Wᵀ + b` with parameters `{name}.weight` `(out, in)` and `{name}.bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// Names of the weight and bias in the gradient sink (built once, shared by every call).
    sink_slots: SinkSlots,
}

impl Linear {
    fn apply(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        dense_with_sink(
            x,
            &self.weight,
            &self.bias,
            relu,
            Some(self.sink_slots.clone()),
        )
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
    let bound = 1.0 / (inputs as f32).sqrt();
    let weight = params.uniform(&format!("{name}.weight"), &[outputs, inputs], bound)?;
    let bias = params.uniform(&format!("{name}.bias"), &[outputs], bound)?;
    Ok(Linear {
        weight,
        bias,
        sink_slots: SinkSlots::new(params.grad_sink().clone(), name),
    })
}

/// Dense layers with an activation between them (and none after the last).
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Activation,
}

impl Mlp {
    /// Layers `sizes[0] → sizes[1] → …`, named `{name}.{i}`.
    pub fn new(
        params: &mut Params,
        name: &str,
        sizes: &[usize],
        activation: Activation,
    ) -> Result<Self> {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(params, &format!("{name}.{i}"), w[0], w[1]))
            .collect::<Result<_>>()?;
        Ok(Mlp { layers, activation })
    }

    /// Applies the layers; the activation follows every layer but the last unless
    /// `activate_last`.
    pub fn forward(&self, x: &Tensor, activate_last: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let activate = activate_last || i + 1 < self.layers.len();
            h = match (activate, self.activation) {
                (true, Activation::Relu) => layer.forward_relu(&h)?,
                (true, act) => act.apply(&layer.forward(&h)?)?,
                (false, _) => layer.forward(&h)?,
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

/// Stride-2, 4×4 convolutions halving the image, then flattening: `(B, C, S, S) → (B, F)`.
#[derive(Debug, Clone)]
pub struct ConvEncoder {
    convs: Vec<Conv2d>,
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
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let mut convs = Vec::new();
        let mut cin = channels;
        for (i, &cout) in CONV_CHANNELS.iter().take(depth).enumerate() {
            let bound = 1.0 / ((cin * 16) as f32).sqrt();
            let w = params.uniform(&format!("{name}.conv{i}.weight"), &[cout, cin, 4, 4], bound)?;
            let b = params.uniform(&format!("{name}.conv{i}.bias"), &[cout], bound)?;
            convs.push(Conv2d::new(w, Some(b), cfg));
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
            h = self.activation.apply(&conv.forward(&h)?)?;
        }
        Ok(h.flatten_from(1)?)
    }
}

/// The mirror of [`ConvEncoder`]: `(B, F) → (B, C, S, S)` logits/means via 4×4 stride-2
/// transposed convolutions.
#[derive(Debug, Clone)]
pub struct ConvDecoder {
    deconvs: Vec<ConvTranspose2d>,
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
        let cfg = ConvTranspose2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let chans: Vec<usize> = CONV_CHANNELS
            .iter()
            .take(depth)
            .rev()
            .copied()
            .chain([channels])
            .collect();
        let mut deconvs = Vec::new();
        for (i, pair) in chans.windows(2).enumerate() {
            let (cin, cout) = (pair[0], pair[1]);
            let bound = 1.0 / ((cout * 16) as f32).sqrt();
            let w = params.uniform(
                &format!("{name}.deconv{i}.weight"),
                &[cin, cout, 4, 4],
                bound,
            )?;
            let b = params.uniform(&format!("{name}.deconv{i}.bias"), &[cout], bound)?;
            deconvs.push(ConvTranspose2d::new(w, Some(b), cfg));
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
        for (i, deconv) in self.deconvs.iter().enumerate() {
            h = deconv.forward(&h)?;
            if i + 1 < self.deconvs.len() {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }
}
