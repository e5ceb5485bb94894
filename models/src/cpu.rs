//! Helpers of the hand-written CPU kernels.

use std::ops::Range;

use candle_core::{CpuStorage, Layout, Shape, Storage, StorageRef, Tensor};

/// The f32 values of a contiguous CPU tensor; an error naming `what` otherwise.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// `Σ v`, in eight interleaved partial sums (vectorised; a sum in order is one dependent add per
/// value). The order is fixed, so the result depends on `v` alone.
#[inline]
pub(crate) fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ f(a, b)` over equally long slices, in eight interleaved partial sums like [`lane_sum`]
/// (a dot product, a squared distance).
#[inline]
pub(crate) fn lane_sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(a, b)| f(*a, *b))
        .sum();
    for (a, b) in ca.zip(cb) {
        for ((l, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *l += f(*a, *b);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `f` applied element by element to two contiguous f32 tensors of one shape: the forward pass
/// of an elementwise CPU op.
pub(crate) fn map2(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
    }
    let (a, b) = (contiguous_f32(s1, l1, op)?, contiguous_f32(s2, l2, op)?);
    let out = a.iter().zip(b).map(|(a, b)| f(*a, *b)).collect();
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// [`map2`] for three inputs.
pub(crate) fn map3(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32, f32) -> f32,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
        candle_core::bail!(
            "{op}: shapes {:?}, {:?} and {:?} differ",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    let (a, b, c) = (
        contiguous_f32(s1, l1, op)?,
        contiguous_f32(s2, l2, op)?,
        contiguous_f32(s3, l3, op)?,
    );
    let out = a
        .iter()
        .zip(b)
        .zip(c)
        .map(|((a, b), c)| f(*a, *b, *c))
        .collect();
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// The values of a contiguous 2-D f32 CPU tensor, wherever in its storage they start: the
/// storage held for reading ([`CpuValues::values`]) and the (rows, cols).
pub(crate) struct CpuValues<'a> {
    storage: StorageRef<'a>,
    range: Range<usize>,
    pub(crate) dims: (usize, usize),
}

impl CpuValues<'_> {
    /// The tensor's values, in row-major order.
    pub(crate) fn values(&self) -> candle_core::Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.range.clone()]),
            _ => candle_core::bail!("expected a CPU tensor"),
        }
    }
}

/// Reads a contiguous CPU tensor of any shape as one row of all its values; an error for any
/// other tensor.
pub(crate) fn cpu_flat(t: &Tensor) -> candle_core::Result<CpuValues<'_>> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(_), Some((start, end))) => Ok(CpuValues {
            storage,
            range: start..end,
            dims: (1, end - start),
        }),
        _ => candle_core::bail!("expected a contiguous CPU tensor, got {:?}", t.layout()),
    }
}

/// Reads a contiguous 2-D CPU tensor's values; an error for any other tensor.
pub(crate) fn cpu_values(t: &Tensor) -> candle_core::Result<CpuValues<'_>> {
    let dims = t.dims2()?;
    Ok(CpuValues {
        dims,
        ..cpu_flat(t)?
    })
}
