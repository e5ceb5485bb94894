//! The data plan: which rows each rank reads at each step, exactly once per epoch.
//!
//! Each epoch has one *global order* of all rows, a function of (seed, epoch) and the dataset
//! alone — never of the world size:
//! 1. the chunks (row groups) are permuted with a seed derived from (seed, epoch), and their rows
//!    laid end to end;
//! 2. that sequence is cut into windows of `shuffle_window` rows (rounded up to a multiple of the
//!    batch size), and each window is permuted with a seed derived from (seed, epoch, window) —
//!    a bounded shuffle, like a shuffle buffer of that size.
//!
//! Step `t` consumes positions `[t·B, (t+1)·B)` of the global order (the last batch of an epoch
//! may be short). Its rows are sorted by where they lie in the chunk sequence and cut into
//! `world` contiguous, near-equal parts; rank `r` takes part `r`. So the rows of a global batch
//! are the same whatever the world size (N workers train like one process), each rank reads
//! mostly its own slice of every window's row groups, and a [`Cursor`] is just (epoch, step):
//! resuming, or re-dealing the rest of an epoch to another world size, visits every remaining
//! row exactly once.
//!
//! A plan may carry a [`LabeledSet`] ([`DataPlan::with_labeled`]). Then only the rows it keeps
//! show their labels; or, composing every global batch of `per_batch` labeled rows beside the
//! batch of unlabeled rows above, every row of the global order counts as unlabeled (still
//! exactly once per epoch) and the labeled rows come from the set, cycled: global step `g`
//! takes positions `[g·L, (g+1)·L)` of an endless sequence of the set's rows, each pass over the
//! set permuted with a seed derived from (seed, pass). The labeled rows of a step are cut into
//! `world` contiguous parts like the others, so they too are the same at any world size and
//! after a resume.

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::labeled::LabeledSet;
use crate::seed::derive_seed;

/// A row of the dataset: a chunk index (into the chunk list the plan was built from) and a row
/// within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowRef {
    /// Chunk index.
    pub chunk: u32,
    /// Row within the chunk.
    pub row: u32,
}

/// Position in the data plan: the next step to take in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Steps of that epoch already taken.
    pub step: u64,
}

impl Cursor {
    /// The start of an epoch.
    pub fn start(epoch: u64) -> Self {
        Cursor { epoch, step: 0 }
    }
}

const CHUNK_STREAM: u64 = 1;
const WINDOW_STREAM: u64 = 2;
const LABELED_STREAM: u64 = 7;

/// How a plan's batches show labels.
#[derive(Debug, Clone)]
pub enum LabelPlan {
    /// As the data has them.
    AsRead,
    /// Only on the rows the set keeps.
    Kept(Arc<LabeledSet>),
    /// On `per_batch` rows of every global batch, drawn from the set (cycled); on no other.
    Composed {
        /// The labeled rows (pixels loaded).
        set: Arc<LabeledSet>,
        /// Labeled rows per global batch.
        per_batch: u64,
    },
}

/// The plan of a dataset for one run: chunk sizes, seed, global batch size and shuffle window.
#[derive(Debug, Clone)]
pub struct DataPlan {
    chunk_rows: Vec<u64>,
    rows: u64,
    seed: u64,
    batch: u64,
    window: u64,
    shuffle: bool,
    labels: LabelPlan,
}

impl DataPlan {
    /// A plan over chunks of the given row counts. `shuffle_window` is rounded up to a multiple
    /// of `batch_size`. With `shuffle` false the global order is the file order (for evaluation).
    pub fn new(
        chunk_rows: Vec<u64>,
        seed: u64,
        batch_size: u64,
        shuffle_window: u64,
        shuffle: bool,
    ) -> Result<Self> {
        if batch_size == 0 || shuffle_window == 0 {
            return Err(DataError::Invalid(format!(
                "data plan: batch size ({batch_size}) and shuffle window ({shuffle_window}) must be positive"
            )));
        }
        if chunk_rows.len() > u32::MAX as usize
            || chunk_rows.iter().any(|r| *r > u64::from(u32::MAX))
        {
            return Err(DataError::Invalid(
                "data plan: at most 2^32 chunks of at most 2^32 rows each".into(),
            ));
        }
        let rows = chunk_rows.iter().sum();
        if rows == 0 {
            return Err(DataError::Invalid(
                "data plan: the dataset has no rows".into(),
            ));
        }
        let window = shuffle_window.div_ceil(batch_size) * batch_size;
        Ok(DataPlan {
            chunk_rows,
            rows,
            seed,
            batch: batch_size,
            window,
            shuffle,
            labels: LabelPlan::AsRead,
        })
    }

    /// This plan with labels only on the rows `set` keeps; with `per_batch` > 0, every global
    /// batch also holds `per_batch` labeled rows drawn from the set (whose pixels a stream then
    /// needs loaded) and the batch of the global order holds none (see the module docs).
    pub fn with_labeled(mut self, set: Arc<LabeledSet>, per_batch: u64) -> Result<DataPlan> {
        if set.is_empty() {
            return Err(DataError::Invalid(
                "data plan: the labeled set is empty".into(),
            ));
        }
        self.labels = if per_batch == 0 {
            LabelPlan::Kept(set)
        } else {
            LabelPlan::Composed { set, per_batch }
        };
        Ok(self)
    }

    /// How the batches show labels.
    pub fn labels(&self) -> &LabelPlan {
        &self.labels
    }

    /// Labeled rows each global batch carries beside the global order's (0 unless composed).
    pub fn labeled_per_batch(&self) -> u64 {
        match self.labels {
            LabelPlan::Composed { per_batch, .. } => per_batch,
            _ => 0,
        }
    }

    /// Rows per epoch.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Global batch size.
    pub fn batch_size(&self) -> u64 {
        self.batch
    }

    /// Steps per epoch (the last may be short).
    pub fn steps_per_epoch(&self) -> u64 {
        self.rows.div_ceil(self.batch)
    }

    /// Rows in the global batch of a step.
    pub fn batch_rows(&self, step: u64) -> u64 {
        self.batch.min(self.rows.saturating_sub(step * self.batch))
    }

    /// The global order of one epoch.
    pub fn epoch(&self, epoch: u64) -> EpochOrder<'_> {
        let mut order: Vec<u32> = (0..self.chunk_rows.len() as u32).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, &[CHUNK_STREAM, epoch]));
            order.shuffle(&mut rng);
        }
        let mut starts = Vec::with_capacity(order.len());
        let mut at = 0u64;
        for &c in &order {
            starts.push(at);
            at += self.chunk_rows[c as usize];
        }
        EpochOrder {
            plan: self,
            epoch,
            order,
            starts,
        }
    }

    /// The batches rank `rank` of `world` reads from `cursor` to the end of the cursor's epoch.
    pub fn rank_plan(&self, cursor: Cursor, world: u32, rank: u32) -> Result<RankPlan<'_>> {
        if world == 0 || rank >= world {
            return Err(DataError::Invalid(format!(
                "data plan: rank {rank} is not in a world of {world}"
            )));
        }
        if cursor.step > self.steps_per_epoch() {
            return Err(DataError::Invalid(format!(
                "data plan: cursor step {} is past the end of the epoch ({} steps)",
                cursor.step,
                self.steps_per_epoch()
            )));
        }
        Ok(RankPlan {
            order: self.epoch(cursor.epoch),
            window: None,
            pass: None,
            next_step: cursor.step,
            world,
            rank,
        })
    }

    /// `rank_plan` from the start of an epoch.
    pub fn plan(&self, epoch: u64, world: u32, rank: u32) -> Result<RankPlan<'_>> {
        self.rank_plan(Cursor::start(epoch), world, rank)
    }
}

/// The global order of one epoch.
#[derive(Debug, Clone)]
pub struct EpochOrder<'a> {
    plan: &'a DataPlan,
    epoch: u64,
    order: Vec<u32>,
    starts: Vec<u64>,
}

impl EpochOrder<'_> {
    /// Offsets into the epoch's chunk sequence of the positions of window `index`, in order.
    fn window(&self, index: u64) -> Vec<u64> {
        let start = index * self.plan.window;
        let end = (start + self.plan.window).min(self.plan.rows);
        let mut offsets: Vec<u64> = (start..end).collect();
        if self.plan.shuffle {
            let seed = derive_seed(self.plan.seed, &[WINDOW_STREAM, self.epoch, index]);
            offsets.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        offsets
    }

    /// The row at an offset of the chunk sequence.
    fn row_at(&self, offset: u64) -> RowRef {
        let i = self.starts.partition_point(|s| *s <= offset) - 1;
        RowRef {
            chunk: self.order[i],
            row: (offset - self.starts[i]) as u32,
        }
    }
}

/// The batches of one rank, step by step, to the end of an epoch.
#[derive(Debug, Clone)]
pub struct RankPlan<'a> {
    order: EpochOrder<'a>,
    window: Option<(u64, Vec<u64>)>,
    /// The labeled set's order in the current pass over it (composed plans).
    pass: Option<(u64, Vec<u32>)>,
    next_step: u64,
    world: u32,
    rank: u32,
}

/// One step of a rank's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBatch {
    /// Where the plan stands after this batch.
    pub cursor_after: Cursor,
    /// Rows of the whole global batch (all ranks, labeled rows of a composed plan included).
    pub global_rows: u64,
    /// This rank's rows of the global order, sorted by position in the chunk sequence.
    pub rows: Vec<RowRef>,
    /// This rank's labeled rows from the labeled set (composed plans), in their order, each
    /// with the pass over the set it belongs to (a row's visit: dynamic binarisation draws
    /// afresh for every pass).
    pub labeled: Vec<(RowRef, u64)>,
}

impl RankPlan<'_> {
    /// How the plan's batches show labels.
    pub fn labels(&self) -> &LabelPlan {
        &self.order.plan.labels
    }

    /// The cursor of the next batch.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.order.epoch,
            step: self.next_step,
        }
    }

    /// Steps per shuffle window.
    pub fn steps_per_window(&self) -> u64 {
        self.order.plan.window / self.order.plan.batch
    }

    /// The labeled rows of global step `global` (composed plans): positions
    /// `[global·L, (global+1)·L)` of the set's rows, each pass over them in its own order; with
    /// the pass each belongs to.
    fn labeled_rows(&mut self, global: u64) -> Vec<(RowRef, u64)> {
        let plan = self.order.plan;
        let LabelPlan::Composed { set, per_batch } = &plan.labels else {
            return Vec::new();
        };
        let n = set.len() as u64;
        (global * per_batch..(global + 1) * per_batch)
            .map(|position| {
                let pass = position / n;
                if self.pass.as_ref().map(|(p, _)| *p) != Some(pass) {
                    let mut order: Vec<u32> = (0..n as u32).collect();
                    let seed = derive_seed(plan.seed, &[LABELED_STREAM, pass]);
                    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                    self.pass = Some((pass, order));
                }
                let (_, order) = self.pass.as_ref().expect("the pass was just set");
                (set.row(order[(position % n) as usize] as usize), pass)
            })
            .collect()
    }

    /// The remaining batches of the current shuffle window (empty at the end of the epoch).
    /// Reading window by window lets a reader know when a decoded chunk is needed for the
    /// last time.
    pub fn next_window(&mut self) -> Vec<PlannedBatch> {
        let per_window = self.steps_per_window();
        let end = (self.next_step / per_window + 1) * per_window;
        let mut batches = Vec::new();
        while self.next_step < end {
            match self.next() {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        batches
    }
}

impl Iterator for RankPlan<'_> {
    type Item = PlannedBatch;

    fn next(&mut self) -> Option<PlannedBatch> {
        let plan = self.order.plan;
        let step = self.next_step;
        if step >= plan.steps_per_epoch() {
            return None;
        }
        let window_index = step / self.steps_per_window();
        if self.window.as_ref().map(|(i, _)| *i) != Some(window_index) {
            self.window = Some((window_index, self.order.window(window_index)));
        }
        let (_, window) = self.window.as_ref().expect("window was just set");
        let first = (step * plan.batch - window_index * plan.window) as usize;
        let global_rows = plan.batch_rows(step);
        let mut offsets = window[first..first + global_rows as usize].to_vec();
        offsets.sort_unstable();
        let (lo, hi) = share(global_rows, self.world, self.rank);
        let rows = offsets[lo as usize..hi as usize]
            .iter()
            .map(|o| self.order.row_at(*o))
            .collect();
        let labeled_all = self.labeled_rows(self.order.epoch * plan.steps_per_epoch() + step);
        let (lo, hi) = share(labeled_all.len() as u64, self.world, self.rank);
        let labeled = labeled_all[lo as usize..hi as usize].to_vec();
        self.next_step += 1;
        Some(PlannedBatch {
            cursor_after: self.cursor(),
            global_rows: global_rows + labeled_all.len() as u64,
            rows,
            labeled,
        })
    }
}

/// The half-open range of `n` items that rank `rank` of `world` takes: near-equal contiguous
/// parts, the first `n % world` ranks one larger.
pub fn share(n: u64, world: u32, rank: u32) -> (u64, u64) {
    let (w, r) = (u64::from(world), u64::from(rank));
    let base = n / w;
    let extra = n % w;
    let lo = r * base + r.min(extra);
    let hi = lo + base + u64::from(r < extra);
    (lo, hi)
}
