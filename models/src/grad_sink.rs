//! A gradient sink: the flat gradient buffer that fused layers write their parameter gradients
//! into directly during the backward pass — the way DDP's buckets receive gradients — instead
//! of handing them to candle, which would allocate a zeroed tensor per parameter and add into
//! it. Disabled by default: then every gradient goes through candle as usual.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Per-parameter gradient slots in one flat buffer, in parameter-name order.
#[derive(Debug, Default)]
pub struct GradSink {
    enabled: AtomicBool,
    state: Mutex<SinkState>,
}

#[derive(Debug, Default)]
struct SinkState {
    data: Vec<f32>,
    slots: BTreeMap<String, Range<usize>>,
    /// Step in which each slot was last written, by name.
    written: BTreeMap<String, u64>,
    step: u64,
}

impl GradSink {
    /// Lays out the slots: one per parameter, in the given (name-sorted) order.
    pub(crate) fn set_layout(&self, sizes: impl IntoIterator<Item = (String, usize)>) {
        let mut state = self.state.lock().expect("gradient sink lock");
        let mut offset = 0;
        state.slots = sizes
            .into_iter()
            .map(|(name, len)| {
                let range = offset..offset + len;
                offset += len;
                (name, range)
            })
            .collect();
        state.data = vec![0.0; offset];
        state.written.clear();
    }

    /// Turns direct deposits on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Whether fused layers deposit here.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Starts a new backward pass: earlier deposits no longer count.
    pub fn begin_step(&self) {
        self.state.lock().expect("gradient sink lock").step += 1;
    }

    /// Hands `write` the slot of parameter `name` and whether it already holds a gradient of
    /// this step (then `write` must add to it; otherwise overwrite it).
    pub(crate) fn deposit<R>(
        &self,
        name: &str,
        write: impl FnOnce(&mut [f32], bool) -> R,
    ) -> Option<R> {
        let mut state = self.state.lock().expect("gradient sink lock");
        let state = &mut *state;
        let range = state.slots.get(name)?.clone();
        let accumulate = state.written.get(name) == Some(&state.step);
        state.written.insert(name.to_string(), state.step);
        Some(write(&mut state.data[range], accumulate))
    }

    /// The gradient parameter `name` received in this step, if any was deposited.
    pub fn with_gradient<R>(&self, name: &str, read: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let state = self.state.lock().expect("gradient sink lock");
        if state.written.get(name) != Some(&state.step) {
            return None;
        }
        let range = state.slots.get(name)?.clone();
        Some(read(&state.data[range]))
    }
}
