//! Non-gradient model state (EMA codebooks, running moments), by name: declared by the model,
//! never seen by the optimiser, updated from all-reduced statistics identically on every
//! replica, and saved, restored, handed over and checksummed by the trainer like parameters.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

use crate::error::{ModelError, Result};

/// Named f32 state tensors, sorted by name (never HashMap order).
#[derive(Debug, Clone)]
pub struct Buffers {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl Buffers {
    /// An empty store on `device`.
    pub fn new(device: &Device) -> Self {
        Buffers {
            vars: BTreeMap::new(),
            device: device.clone(),
        }
    }

    /// Declares a buffer with its initial values; returns the tensor the model reads: it sees
    /// every later [`Buffers::set`] (same storage) and carries no gradient.
    pub fn declare(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            return Err(ModelError::Spec(format!("buffer {name} declared twice")));
        }
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let t = var.as_tensor().detach();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }

    /// Buffers in name order.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The current values of buffer `name`, flattened.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.var(name)?.as_tensor().flatten_all()?.to_vec1()?)
    }

    /// Buffer `name` as a tensor on the store's device (no copy to the host); it sees every
    /// later [`Buffers::set`].
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.var(name)?.as_tensor().detach())
    }

    /// Replaces the values of buffer `name` (same number of values).
    pub fn set(&self, name: &str, values: &[f32]) -> Result<()> {
        let var = self.var(name)?;
        if values.len() != var.elem_count() {
            return Err(ModelError::Input(format!(
                "buffer {name} holds {} values, got {}",
                var.elem_count(),
                values.len()
            )));
        }
        var.set(&Tensor::from_slice(values, var.shape(), &self.device)?)?;
        Ok(())
    }

    /// Replaces the values of buffer `name` with `values`, a tensor of its shape on its device
    /// (copied there, in f32).
    pub fn set_tensor(&self, name: &str, values: &Tensor) -> Result<()> {
        let var = self.var(name)?;
        if values.shape() != var.shape() {
            return Err(ModelError::Input(format!(
                "buffer {name} has shape {:?}, got {:?}",
                var.shape().dims(),
                values.dims()
            )));
        }
        var.set(&values.to_dtype(candle_core::DType::F32)?)?;
        Ok(())
    }

    fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| ModelError::Input(format!("the model has no buffer {name}")))
    }
}
