//! Streaming a rank's plan into f32 batches with a bounded memory footprint.
//!
//! The stream plans two shuffle windows ahead. Chunks are decoded, in the order batches first
//! need them, on a small thread pool up to `2 × decode_threads` ahead, and dropped after the
//! last planned batch that needs them. What is held at once is the decoded chunks overlapping
//! the current window plus those decoded ahead: about `(shuffle_window + (2 + 2 ×
//! decode_threads) × largest row group) × bytes per row`, plus the batch being assembled —
//! never the dataset.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::binarize::Binarizer;
use crate::chunk_reader::ChunkData;
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::plan::{Cursor, LabelPlan, PlannedBatch, RankPlan};
use crate::prefetch::Prefetcher;

/// One minibatch of one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Examples, row-major, `dim` values each, in [0, 1] for uint8 data.
    pub x: Vec<f32>,
    /// Values per example.
    pub dim: usize,
    /// Labels (`None` = unlabeled).
    pub labels: Vec<Option<i64>>,
    /// Stable row ids.
    pub ids: Vec<u64>,
    /// Rows of the global batch this is part of (all ranks together).
    pub global_rows: u64,
    /// Plan position after this batch: save it to resume after it.
    pub cursor_after: Cursor,
}

impl Batch {
    /// Rows in this rank's batch.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }
}

/// Iterator of a rank's batches to the end of an epoch.
pub struct BatchStream<'a> {
    dataset: Arc<Dataset>,
    plan: RankPlan<'a>,
    /// How the plan shows labels.
    labels: LabelPlan,
    binarizer: Binarizer,
    /// Planned batches not yet served: the rest of the current window and the next one.
    pending: VecDeque<PlannedBatch>,
    /// Index (counting every batch this stream planned) of the last batch needing each chunk.
    last_use: BTreeMap<u32, u64>,
    planned: u64,
    served: u64,
    plan_done: bool,
    decoded: BTreeMap<u32, ChunkData>,
    /// Chunks decoded, in flight or queued for decoding.
    scheduled: BTreeSet<u32>,
    to_submit: VecDeque<u32>,
    prefetch: Prefetcher,
    ahead: usize,
    failed: bool,
}

impl<'a> BatchStream<'a> {
    /// A stream over `plan`'s batches of `dataset` (the plan must have been built from
    /// `dataset.chunks()`), decoding up to `2 × decode_threads` chunks ahead on that many
    /// threads (0: decode on the calling thread, when needed).
    pub fn new(
        dataset: Arc<Dataset>,
        plan: RankPlan<'a>,
        binarizer: Binarizer,
        decode_threads: usize,
    ) -> Self {
        let prefetch = Prefetcher::new(&dataset, decode_threads);
        BatchStream {
            dataset,
            labels: plan.labels().clone(),
            plan,
            binarizer,
            pending: VecDeque::new(),
            last_use: BTreeMap::new(),
            planned: 0,
            served: 0,
            plan_done: false,
            decoded: BTreeMap::new(),
            scheduled: BTreeSet::new(),
            to_submit: VecDeque::new(),
            prefetch,
            ahead: 2 * decode_threads,
            failed: false,
        }
    }

    /// Chunks decoded or being decoded right now (for measuring the footprint).
    pub fn held_chunks(&self) -> usize {
        self.decoded.len() + self.prefetch.in_flight()
    }

    /// Plans whole windows until the current and the next window are both pending, so that a
    /// chunk straddling a window boundary is kept, not decoded twice.
    fn plan_ahead(&mut self) {
        let per_window = self.plan.steps_per_window() as usize;
        while !self.plan_done && self.pending.len() <= per_window {
            let window = self.plan.next_window();
            self.plan_done = window.is_empty();
            for batch in window {
                for r in &batch.rows {
                    self.last_use.insert(r.chunk, self.planned);
                    if self.scheduled.insert(r.chunk) {
                        self.to_submit.push_back(r.chunk);
                    }
                }
                self.pending.push_back(batch);
                self.planned += 1;
            }
        }
        while self.prefetch.in_flight() < self.ahead {
            match self.to_submit.pop_front() {
                Some(chunk) => self.prefetch.submit(chunk),
                None => break,
            }
        }
    }

    fn assemble(&mut self, planned: PlannedBatch) -> Result<Batch> {
        let dim = self.dataset.schema().dim;
        let epoch = planned.cursor_after.epoch;
        let n = planned.rows.len() + planned.labeled.len();
        let mut batch = Batch {
            x: vec![0.0; n * dim],
            dim,
            labels: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            global_rows: planned.global_rows,
            cursor_after: planned.cursor_after,
        };
        for (r, out) in planned
            .rows
            .iter()
            .zip(batch.x.chunks_exact_mut(dim.max(1)))
        {
            if !self.decoded.contains_key(&r.chunk) {
                self.to_submit.retain(|c| *c != r.chunk);
                let data = self.prefetch.take(&self.dataset, r.chunk)?;
                self.decoded.insert(r.chunk, data);
            }
            let data = &self.decoded[&r.chunk];
            let row = r.row as usize;
            data.copy_row(row, dim, out);
            self.binarizer.apply(out, data.ids[row], epoch);
            batch.labels.push(match &self.labels {
                LabelPlan::AsRead => data.labels[row],
                LabelPlan::Kept(set) => set.label(*r),
                LabelPlan::Composed { .. } => None,
            });
            batch.ids.push(data.ids[row]);
        }
        if let LabelPlan::Composed { set, .. } = &self.labels {
            let outs = batch.x[planned.rows.len() * dim..].chunks_exact_mut(dim.max(1));
            for ((r, pass), out) in planned.labeled.iter().zip(outs) {
                let (id, label) = set.copy_row(*r, out).ok_or_else(|| {
                    DataError::Invalid(
                        "data plan: the labeled set's rows are not loaded (LabeledSet::load)"
                            .into(),
                    )
                })?;
                self.binarizer.apply(out, id, *pass);
                batch.labels.push(Some(label));
                batch.ids.push(id);
            }
        }
        let served = self.served;
        let last_use = &self.last_use;
        let scheduled = &mut self.scheduled;
        self.decoded.retain(|chunk, _| {
            let keep = last_use.get(chunk).is_some_and(|last| *last > served);
            if !keep {
                scheduled.remove(chunk);
            }
            keep
        });
        self.served += 1;
        Ok(batch)
    }
}

impl Iterator for BatchStream<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        self.plan_ahead();
        let planned = self.pending.pop_front()?;
        let out = self.assemble(planned);
        self.failed = out.is_err();
        Some(out)
    }
}
