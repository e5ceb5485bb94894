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
    slots: BTreeMap<String, Slot>,
    step: u64,
}

#[derive(Debug)]
struct Slot {
    range: Range<usize>,
    /// The step in which the slot was last written (0: never).
    written: u64,
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
                (name, Slot { range, written: 0 })
            })
            .collect();
        state.data = vec![0.0; offset];
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
    /// (Steps count from 1, so a slot never written is never current.)
    pub fn begin_step(&self) {
        self.state.lock().expect("gradient sink lock").step += 1;
    }

    /// The backward pass deposits now count for (see [`GradSink::begin_step`]).
    pub(crate) fn current_step(&self) -> u64 {
        self.state.lock().expect("gradient sink lock").step
    }

    /// Counts the deposits of pass `from` as the current pass's, to be added to: one backward
    /// pass taken in segments across the trainer's calls, which starts a pass of its own
    /// before the last (batch norm, [`crate::Norms`]).
    pub(crate) fn carry_over(&self, from: u64) {
        let mut state = self.state.lock().expect("gradient sink lock");
        let step = state.step;
        for slot in state.slots.values_mut() {
            if slot.written == from {
                slot.written = step;
            }
        }
    }

    /// Hands `write` the slot of parameter `name` and whether it already holds a gradient of
    /// this step (then `write` must add to it; otherwise overwrite it).
    pub(crate) fn deposit<R>(
        &self,
        name: &str,
        write: impl FnOnce(&mut [f32], bool) -> R,
    ) -> Option<R> {
        let mut state = self.state.lock().expect("gradient sink lock");
        let SinkState { data, slots, step } = &mut *state;
        let slot = slots.get_mut(name)?;
        let accumulate = slot.written == *step;
        slot.written = *step;
        Some(write(&mut data[slot.range.clone()], accumulate))
    }

    /// The gradient parameter `name` received in this step, if any was deposited.
    pub fn with_gradient<R>(&self, name: &str, read: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let state = self.state.lock().expect("gradient sink lock");
        let slot = state.slots.get(name).filter(|s| s.written == state.step)?;
        Some(read(&state.data[slot.range.clone()]))
    }
}
