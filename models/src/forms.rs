//! Which form an op takes. Each op with a fused CPU kernel (dense layers, convolutions, the
//! likelihoods, the reparameterisation, batch norm, the PixelCNN gate) takes it for f32 on the
//! CPU, and otherwise its composed form: candle's ops, which every device runs, and the only
//! form a GPU runs. The VQ quantiser's nearest-code search takes its host form on the CPU for
//! any dtype. [`ComposedForms`] makes the ops called on one thread take their composed
//! forms on the CPU too, so that what a GPU computes is checked against the fused kernels on a
//! machine without one (`engine/tests/composed.rs`).

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};

thread_local! {
    static COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Whether an op over `t` takes its fused CPU kernel.
pub(crate) fn fused(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && fused_on(t.device())
}

/// Whether ops on `device` take their fused CPU kernels (f32 given).
pub(crate) fn fused_on(device: &Device) -> bool {
    device.is_cpu() && !COMPOSED.with(Cell::get)
}

/// While a value of this type lives, the ops called on its thread take their composed forms
/// (the forms a GPU runs) on the CPU as well; dropping it restores what was in force before, so
/// guards nest. Other threads are unaffected. For checking the composed forms, not for speed:
/// on the CPU the fused kernels are the fast path.
#[derive(Debug)]
#[must_use = "the composed forms are in force only while the guard lives"]
pub struct ComposedForms {
    before: bool,
    /// The guard restores its own thread's setting, so it stays there.
    _thread: std::marker::PhantomData<*const ()>,
}

impl ComposedForms {
    /// Composed forms on this thread until the guard is dropped.
    pub fn on() -> Self {
        ComposedForms {
            before: COMPOSED.with(|c| c.replace(true)),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for ComposedForms {
    fn drop(&mut self) {
        COMPOSED.with(|c| c.set(self.before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_holds_on_its_own_thread_and_nests() {
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(fused(&t));
        assert!(!fused(&t.to_dtype(DType::F64).unwrap()));
        {
            let _outer = ComposedForms::on();
            assert!(!fused(&t));
            {
                let _inner = ComposedForms::on();
                assert!(!fused(&t));
            }
            assert!(
                !fused(&t),
                "the inner guard restores the outer one's setting"
            );
            let other =
                std::thread::spawn(|| fused(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()));
            assert!(
                other.join().unwrap(),
                "another thread keeps its fused kernels"
            );
        }
        assert!(fused(&t));
    }
}
