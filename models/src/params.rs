//! Parameters by name, initialised from a seeded RNG (candle's CPU RNG cannot be seeded).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::grad_sink::GradSink;

/// The trainable parameters of a model, sorted by name (never HashMap order).
#[derive(Debug, Clone)]
pub struct Params {
    vars: BTreeMap<String, Var>,
    device: Device,
    rng: ChaCha8Rng,
    sink: Arc<GradSink>,
}

impl Params {
    /// An empty store whose initialisations are drawn from `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        Params {
            vars: BTreeMap::new(),
            device: device.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            sink: Arc::new(GradSink::default()),
        }
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters in name order.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The sink fused layers deposit gradients into (disabled until enabled).
    pub fn grad_sink(&self) -> &Arc<GradSink> {
        &self.sink
    }

    /// Lays out the gradient sink over all parameters and turns direct deposits on: fused
    /// layers then put their parameter gradients there instead of into candle's `GradStore`.
    pub fn enable_grad_sink(&self) {
        self.sink
            .set_layout(self.vars.iter().map(|(n, v)| (n.clone(), v.elem_count())));
        self.sink.set_enabled(true);
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// A new parameter with values uniform in `[-bound, bound]`.
    pub fn uniform(&mut self, name: &str, shape: &[usize], bound: f32) -> Result<Tensor> {
        let n = checked_len(name, shape)?;
        let values: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        self.insert(name, Tensor::from_vec(values, shape, &self.device)?)
    }

    /// A new parameter filled with `value`.
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Tensor> {
        checked_len(name, shape)?;
        self.insert(
            name,
            (Tensor::ones(shape, DType::F32, &self.device)? * f64::from(value))?,
        )
    }

    /// A new parameter holding `values` (laid out as `shape`).
    pub fn with_values(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
        checked_len(name, shape)?;
        self.insert(name, Tensor::from_vec(values, shape, &self.device)?)
    }

    fn insert(&mut self, name: &str, init: Tensor) -> Result<Tensor> {
        assert!(
            !self.vars.contains_key(name),
            "parameter {name} defined twice"
        );
        let var = Var::from_tensor(&init)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }
}

/// Most scalars one parameter may hold (2^31: 8 GiB of f32).
pub const MAX_PARAM_VALUES: usize = 1 << 31;

fn checked_len(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n <= MAX_PARAM_VALUES)
        .ok_or_else(|| {
            ModelError::Spec(format!(
                "parameter {name} of shape {shape:?} would hold more than {MAX_PARAM_VALUES} values; choose smaller layers"
            ))
        })
}
