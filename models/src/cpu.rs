//! Helpers of the hand-written CPU kernels.

use candle_core::{CpuStorage, Layout};

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
