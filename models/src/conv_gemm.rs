//! Convolutions off the fused CPU path (on a GPU, or in another dtype than f32), composed of
//! candle's `conv2d` — im2col and a gemm, cuBLAS on CUDA — with hand-written backward passes.
//!
//! candle's `conv_transpose2d` runs a direct kernel on CUDA that uses no gemm, and candle's own
//! backward of `conv2d` takes the input's gradient with it; without it a 64 px conv VAE step at
//! batch 1024 takes 49 ms instead of 70 on an H200. Nothing here calls it:
//!
//! - a transposed convolution with stride `s` and kernel `k` is `s²` stride-1 convolutions of its
//!   input, one per output phase `(r₁, r₂)`, by the kernel's taps `r, r + s, …` flipped
//!   (polyphase); the phases' kernels are stacked along the output channels, so it is one
//!   `conv2d`, whose output is interleaved and cropped by the padding;
//! - a convolution's input gradient is the transposed convolution of its output gradient, and a
//!   transposed convolution's is the convolution of its output gradient by the same weights;
//! - a weight gradient is one convolution of the input, batch and channels swapped, by the
//!   output gradient, dilated by the stride (as candle's backward does it).
//!
//! The value is computed from detached operands and joined to candle's graph by an op whose
//! forward hands it over and whose backward is the above.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor,
};

use crate::conv::ConvSpec;
use crate::error::Result;

/// `conv2d` of [`crate::conv`] composed of candle's `conv2d` (see the module's documentation).
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    relu: bool,
) -> Result<Tensor> {
    let d = spec.dims(x.shape(), w.shape(), b.shape())?;
    let (xd, wd) = (x.detach(), w.detach());
    let y = if spec.transposed {
        transposed(
            &xd,
            &wd,
            spec.stride,
            spec.padding,
            (d.output.1, d.output.2),
        )?
    } else {
        xd.conv2d(&wd, spec.padding, spec.stride, 1, 1)?
    };
    let y = y.broadcast_add(&b.detach().reshape((1, d.output.0, 1, 1))?)?;
    let y = if relu { y.relu()? } else { y };
    let value = Mutex::new(Some(y));
    Ok(x.apply_op3(w, b, Joined { value, spec, relu })?)
}

/// The transposed convolution of `x` (N, C, H, W) by `w` (C, O, k, k) with `stride` and
/// `padding`, cropped to `out` (height, width) — the output padding is what `out` adds.
fn transposed(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    out: (usize, usize),
) -> candle_core::Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, o, k, _) = w.dims4()?;
    let s = stride;
    // Taps per phase, the kernel padded with zeros to s·taps so that every phase has as many.
    let taps = k.div_ceil(s);
    let w = if s * taps > k {
        w.pad_with_zeros(2, 0, s * taps - k)?
            .pad_with_zeros(3, 0, s * taps - k)?
    } else {
        w.clone()
    };
    // Kernel row (r, t) of phase r is tap r + s·(taps − 1 − t): the taps, flipped.
    let order: Vec<u32> = (0..s)
        .flat_map(|r| (0..taps).map(move |t| (r + s * (taps - 1 - t)) as u32))
        .collect();
    let order = Tensor::from_vec(order, s * taps, x.device())?;
    let kernel = w
        .index_select(&order, 2)?
        .index_select(&order, 3)?
        .reshape((c, o, s, taps, s, taps))?
        .permute((2, 4, 1, 0, 3, 5))?
        .contiguous()?
        .reshape((s * s * o, c, taps, taps))?;
    // Phase outputs (full convolutions: padded by taps − 1), long enough for the crop.
    let phases = x.conv2d(&kernel, taps - 1, 1, 1, 1)?;
    let (ph, pw) = (h + taps - 1, wd + taps - 1);
    let (lh, lw) = (
        ph.max((padding + out.0).div_ceil(s)),
        pw.max((padding + out.1).div_ceil(s)),
    );
    let phases = phases
        .pad_with_zeros(2, 0, lh - ph)?
        .pad_with_zeros(3, 0, lw - pw)?;
    phases
        .reshape((n, s, s, o, lh, lw))?
        .permute((0, 3, 4, 1, 5, 2))?
        .contiguous()?
        .reshape((n, o, lh * s, lw * s))?
        .narrow(2, padding, out.0)?
        .narrow(3, padding, out.1)?
        .contiguous()
}

/// `Σ_n big[n, a, s·i + p, s·j + q] · small[n, b, i, j]` over the zero-padded `big` — a weight
/// gradient, (big's channels, small's channels, k, k).
fn weight_grad(
    big: &Tensor,
    small: &Tensor,
    spec: ConvSpec,
    k: usize,
) -> candle_core::Result<Tensor> {
    let big = big.transpose(0, 1)?.contiguous()?;
    let small = small.transpose(0, 1)?.contiguous()?;
    big.conv2d(&small, spec.padding, 1, spec.stride, 1)?
        .narrow(2, 0, k)?
        .narrow(3, 0, k)
}

/// The op that joins a value computed from detached operands to the graph of `x`, `W` and `b`.
struct Joined {
    /// The value, handed over (once) by the forward pass.
    value: Mutex<Option<Tensor>>,
    spec: ConvSpec,
    relu: bool,
}

impl Joined {
    /// The value, contiguous from the start of its storage.
    fn take(&self) -> candle_core::Result<Tensor> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv: a poisoned value".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("conv: the value was handed over".into()))?;
        let l = value.layout();
        if l.is_contiguous() && l.start_offset() == 0 {
            Ok(value)
        } else {
            value.copy()
        }
    }
}

/// The storage of `value` and its shape, as `pick` finds it.
fn handed<S: BackendStorage>(
    value: &Tensor,
    pick: impl FnOnce(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)> {
    let (storage, layout) = value.storage_and_layout();
    let s = pick(&storage)
        .ok_or_else(|| candle_core::Error::Msg("conv: the value is on another device".into()))?;
    Ok((s.try_clone(layout)?, layout.shape().clone()))
}

impl CustomOp3 for Joined {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        handed(&self.take()?, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        handed(&self.take()?, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        handed(&self.take()?, |s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.spec;
        let need_dx = x.track_op();
        let (x, w) = (x.detach(), w.detach());
        let g = if self.relu {
            dy.mul(&y.gt(0.0)?.to_dtype(dy.dtype())?)?
        } else {
            dy.detach()
        };
        let k = w.dim(2)?;
        let (dx, dw) = if s.transposed {
            let dx = if need_dx {
                Some(g.conv2d(&w, s.padding, s.stride, 1, 1)?)
            } else {
                None
            };
            (dx, weight_grad(&g, &x, s, k)?)
        } else {
            let dx = if need_dx {
                let (_, _, h, wd) = x.dims4()?;
                Some(transposed(&g, &w, s.stride, s.padding, (h, wd))?)
            } else {
                None
            };
            (dx, weight_grad(&x, &g, s, k)?)
        };
        let dw = dw.transpose(0, 1)?.contiguous()?;
        Ok((dx, Some(dw), Some(g.sum((0, 2, 3))?)))
    }
}
