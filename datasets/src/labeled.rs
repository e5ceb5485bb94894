//! Semi-supervised data: which rows keep their labels.
//!
//! `select(ds, per_class, seed)` keeps the labels of `per_class` rows of every class (0: every
//! labeled row): the rows of a class in file order, shuffled with a seed derived from (seed,
//! class), the first `per_class` taken — a rule of the seed and the data alone, so every worker,
//! at any world size and after any resume, keeps the same rows. Every other row is treated as
//! unlabeled. Class-balanced, like every reference implementation of semi-supervised VAEs.
//!
//! A data plan can carry the set ([`crate::DataPlan::with_labeled`]): its batches then show a
//! label only on the rows the set keeps, or — composing each global batch of a fixed number of
//! labeled rows beside the unlabeled ones — draw the labeled rows from the set, cycling it, and
//! show no label on the others. For that the set holds its rows' pixels ([`LabeledSet::load`]),
//! read once.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::chunk_reader::{read_chunk, read_labels, Pixels};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::plan::RowRef;
use crate::seed::derive_seed;

const SELECT_STREAM: u64 = 6;

/// The rows that keep their labels, with their labels (and, once loaded, their pixels).
#[derive(Debug, Clone)]
pub struct LabeledSet {
    /// Kept rows and their labels, sorted by row.
    rows: Vec<(RowRef, i64)>,
    /// Their ids and pixels (row after row), in the same order, once loaded.
    loaded: Option<(Vec<u64>, Pixels)>,
}

impl LabeledSet {
    /// Keeps the labels of `per_class` rows of every class of `ds` (0: of every labeled row).
    pub fn select(ds: &Dataset, per_class: u64, seed: u64) -> Result<LabeledSet> {
        let mut by_class: BTreeMap<i64, Vec<RowRef>> = BTreeMap::new();
        for (c, chunk) in ds.chunks().iter().enumerate() {
            let (labels, _) = read_labels(ds, chunk)?;
            for (row, label) in labels.iter().enumerate() {
                if let Some(label) = label {
                    let at = RowRef {
                        chunk: c as u32,
                        row: row as u32,
                    };
                    by_class.entry(*label).or_default().push(at);
                }
            }
        }
        if by_class.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: no row has a label; a semi-supervised run needs labeled rows",
                ds.spec()
            )));
        }
        let mut kept = Vec::new();
        for (class, mut rows) in by_class {
            if per_class > 0 {
                if (rows.len() as u64) < per_class {
                    return Err(DataError::Invalid(format!(
                        "{}: {per_class} labeled rows per class asked for, but class {class} has only {}",
                        ds.spec(),
                        rows.len()
                    )));
                }
                let seed = derive_seed(seed, &[SELECT_STREAM, class as u64]);
                rows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                rows.truncate(per_class as usize);
            }
            kept.extend(rows.into_iter().map(|at| (at, class)));
        }
        Ok(LabeledSet::from_rows(kept))
    }

    /// A set of the given rows and the labels they keep (a later duplicate of a row is dropped).
    pub fn from_rows(mut rows: Vec<(RowRef, i64)>) -> LabeledSet {
        rows.sort_by_key(|(at, _)| *at);
        rows.dedup_by_key(|(at, _)| *at);
        LabeledSet { rows, loaded: None }
    }

    /// Rows kept.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is kept.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The kept rows, sorted.
    pub fn rows(&self) -> impl Iterator<Item = RowRef> + '_ {
        self.rows.iter().map(|(at, _)| *at)
    }

    /// The `i`-th kept row.
    pub(crate) fn row(&self, i: usize) -> RowRef {
        self.rows[i].0
    }

    /// Rows kept per class.
    pub fn per_class(&self) -> BTreeMap<i64, u64> {
        let mut counts = BTreeMap::new();
        for (_, class) in &self.rows {
            *counts.entry(*class).or_insert(0) += 1;
        }
        counts
    }

    /// The label a row keeps (`None`: the row counts as unlabeled).
    pub fn label(&self, row: RowRef) -> Option<i64> {
        self.index(row).map(|i| self.rows[i].1)
    }

    fn index(&self, row: RowRef) -> Option<usize> {
        self.rows.binary_search_by(|(at, _)| at.cmp(&row)).ok()
    }

    /// Reads the ids and pixels of the kept rows from `ds` (each row group that holds one,
    /// once).
    pub fn load(&mut self, ds: &Dataset) -> Result<()> {
        let dim = ds.schema().dim;
        let mut ids = Vec::with_capacity(self.len());
        let mut pixels = match ds.schema().pixel {
            crate::PixelType::Uint8 => Pixels::Uint8(Vec::with_capacity(self.len() * dim)),
            crate::PixelType::Float32 => Pixels::Float32(Vec::with_capacity(self.len() * dim)),
        };
        let mut i = 0;
        while i < self.rows.len() {
            let chunk = self.rows[i].0.chunk;
            let data = ds
                .chunks()
                .get(chunk as usize)
                .ok_or_else(|| {
                    DataError::Invalid(format!(
                        "{}: the labeled set names row group {chunk}, which the dataset does not have",
                        ds.spec()
                    ))
                })
                .and_then(|c| read_chunk(ds, c))?;
            while i < self.rows.len() && self.rows[i].0.chunk == chunk {
                let row = self.rows[i].0.row as usize;
                if row >= data.rows() {
                    return Err(DataError::Invalid(format!(
                        "{}: the labeled set names row {row} of row group {chunk}, which has {}",
                        ds.spec(),
                        data.rows()
                    )));
                }
                ids.push(data.ids[row]);
                let range = row * dim..(row + 1) * dim;
                match (&mut pixels, &data.pixels) {
                    (Pixels::Uint8(out), Pixels::Uint8(v)) => out.extend_from_slice(&v[range]),
                    (Pixels::Float32(out), Pixels::Float32(v)) => out.extend_from_slice(&v[range]),
                    _ => {
                        return Err(DataError::Invalid(format!(
                            "{}: row group {chunk} stores another pixel type than the dataset",
                            ds.spec()
                        )))
                    }
                }
                i += 1;
            }
        }
        self.loaded = Some((ids, pixels));
        Ok(())
    }

    /// Copies kept row `row`'s values (in [0, 1] for uint8 data) into `out`; returns its id and
    /// label. The pixels must be loaded.
    pub(crate) fn copy_row(&self, row: RowRef, out: &mut [f32]) -> Option<(u64, i64)> {
        let i = self.index(row)?;
        let (ids, pixels) = self.loaded.as_ref()?;
        let range = i * out.len()..(i + 1) * out.len();
        match pixels {
            Pixels::Uint8(v) => {
                for (o, p) in out.iter_mut().zip(&v[range]) {
                    *o = f32::from(*p) / 255.0;
                }
            }
            Pixels::Float32(v) => out.copy_from_slice(&v[range]),
        }
        Some((ids[i], self.rows[i].1))
    }

    /// Whether the ids and pixels are loaded.
    pub fn loaded(&self) -> bool {
        self.loaded.is_some()
    }
}
