//! One flat f32 buffer for all parameters (sorted by name) and their gradients: what the
//! optimiser updates and what one all-reduce carries.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use elbo_models::GradSink;

use crate::error::{Result, WorkerError};

/// Where each parameter lives in the flat buffer.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Parameter name.
    pub name: String,
    /// The candle variable.
    pub var: Var,
    /// Offset in the flat buffer.
    pub offset: usize,
    /// Number of scalars.
    pub len: usize,
}

/// The layout of named tensors (a model's parameters, or its buffers) in one flat buffer.
#[derive(Debug, Clone, Default)]
pub struct FlatLayout {
    slots: Vec<Slot>,
    len: usize,
}

impl FlatLayout {
    /// Lays out variables in the given (name-sorted) order.
    pub fn new<'a>(vars: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Self {
        let mut offset = 0;
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let len = var.elem_count();
                let slot = Slot {
                    name: name.clone(),
                    var: var.clone(),
                    offset,
                    len,
                };
                offset += len;
                slot
            })
            .collect();
        FlatLayout { slots, len: offset }
    }

    /// The slots in order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Total scalars.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the current parameter values into `out`.
    pub fn read_params(&self, out: &mut [f32]) -> Result<()> {
        for s in &self.slots {
            copy_out(s.var.as_tensor(), &mut out[s.offset..s.offset + s.len])?;
        }
        Ok(())
    }

    /// Copies gradients into `out`: from the gradient sink where a fused layer deposited one
    /// this step, else from candle's store; parameters without a gradient get zeros.
    pub fn read_grads(&self, sink: &GradSink, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        for s in &self.slots {
            let dst = &mut out[s.offset..s.offset + s.len];
            if sink
                .with_gradient(&s.name, |g| dst.copy_from_slice(g))
                .is_some()
            {
                continue;
            }
            match grads.get(s.var.as_tensor()) {
                Some(g) => copy_out(g, dst)?,
                None => dst.fill(0.0),
            }
        }
        Ok(())
    }

    /// The current parameter values as one flat tensor on their device.
    pub fn read_tensor(&self, device: &Device) -> Result<Tensor> {
        if self.slots.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        let parts = self
            .slots
            .iter()
            .map(|s| s.var.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The gradients, one flat tensor per variable in layout order, like
    /// [`FlatLayout::read_grads`] but without leaving the device where candle's gradients live.
    pub fn grad_parts(
        &self,
        sink: &GradSink,
        grads: &GradStore,
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        self.slots
            .iter()
            .map(|s| {
                let deposited = sink
                    .with_gradient(&s.name, |g| Tensor::from_slice(g, s.len, device))
                    .transpose()?;
                Ok(match (deposited, grads.get(s.var.as_tensor())) {
                    (Some(g), _) => g,
                    (None, Some(g)) => g.flatten_all()?,
                    (None, None) => Tensor::zeros(s.len, DType::F32, device)?,
                })
            })
            .collect()
    }

    /// Writes the flat tensor `values` (on the variables' device) back into the variables:
    /// one device copy per variable, nothing through the host.
    pub fn write_tensor(&self, values: &Tensor) -> Result<()> {
        for s in &self.slots {
            let part = values.narrow(0, s.offset, s.len)?.reshape(s.var.shape())?;
            s.var.set(&part)?;
        }
        Ok(())
    }

    /// Writes `values` back into the variables (in place on CPU).
    pub fn write_params(&self, values: &[f32]) -> Result<()> {
        for s in &self.slots {
            let src = &values[s.offset..s.offset + s.len];
            let t = s.var.as_tensor();
            if t.device().is_cpu() {
                t.inplace_op1(&CopyIn(src))?;
            } else {
                s.var
                    .set(&Tensor::from_slice(src, t.shape(), t.device())?)?;
            }
        }
        Ok(())
    }
}

fn copy_out(t: &Tensor, out: &mut [f32]) -> Result<()> {
    if t.elem_count() != out.len() {
        return Err(WorkerError::Internal(format!(
            "tensor of {} values for a slot of {}",
            t.elem_count(),
            out.len()
        )));
    }
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let (a, b) = layout.contiguous_offsets().expect("contiguous");
            out.copy_from_slice(&cpu.as_slice::<f32>()?[a..b]);
            return Ok(());
        }
    }
    out.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

struct CopyIn<'a>(&'a [f32]);

impl InplaceOp1 for CopyIn<'_> {
    fn name(&self) -> &'static str {
        "copy-in"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("copy-in: parameter is not contiguous".into())
        })?;
        match storage {
            CpuStorage::F32(v) => {
                v[a..b].copy_from_slice(self.0);
                Ok(())
            }
            _ => candle_core::bail!("copy-in: parameters are f32"),
        }
    }
}
