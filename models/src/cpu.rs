//! Helpers of the hand-written CPU kernels.

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

/// `t` itself if its values are contiguous from the start of its storage (what
/// [`cpu_values`] reads), otherwise a copy that is.
pub(crate) fn from_start(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.layout().contiguous_offsets() {
        Some((0, _)) => Ok(t.clone()),
        _ => t.force_contiguous(),
    }
}

/// The storage of a contiguous 2-D CPU tensor (read it with [`as_f32`]) and its (rows, cols).
pub(crate) fn cpu_values(t: &Tensor) -> candle_core::Result<(StorageRef<'_>, (usize, usize))> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cpu(_))
        || layout.contiguous_offsets() != Some((0, t.elem_count()))
    {
        candle_core::bail!("expected a contiguous CPU tensor, got {:?}", t.layout());
    }
    let dims = layout.shape().dims2()?;
    Ok((storage, dims))
}

/// The f32 values of a CPU storage.
pub(crate) fn as_f32(storage: &Storage) -> candle_core::Result<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}
