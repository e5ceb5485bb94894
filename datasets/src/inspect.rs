//! Summaries of a dataset: schema, counts, label histogram, value range. Reads every row group,
//! so it also validates every value.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::chunk_reader::{read_chunk, read_labels, Pixels};
use crate::dataset::Dataset;
use crate::error::Result;
use crate::format::PixelType;

/// What `elbo data inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The dataset path, directory or glob.
    pub path: String,
    /// Files in the dataset.
    pub files: usize,
    /// Total rows.
    pub rows: u64,
    /// Non-empty row groups.
    pub row_groups: usize,
    /// Example shape.
    pub shape: Vec<usize>,
    /// Element type of `x`.
    pub pixel_type: PixelType,
    /// Whether rows carry stable ids (otherwise derived from file and position).
    pub has_id: bool,
    /// Rows with a label.
    pub labeled: u64,
    /// Rows without a label.
    pub unlabeled: u64,
    /// Rows per label.
    pub label_histogram: BTreeMap<i64, u64>,
    /// Smallest value of `x` as read (uint8 scaled to [0, 1]).
    pub x_min: f32,
    /// Largest value of `x` as read.
    pub x_max: f32,
}

/// How a dataset is labeled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelCounts {
    /// Rows with a label.
    pub labeled: u64,
    /// Rows without a label.
    pub unlabeled: u64,
    /// Rows per label.
    pub histogram: BTreeMap<i64, u64>,
}

impl LabelCounts {
    fn add(&mut self, labels: &[Option<i64>]) {
        for l in labels {
            match l {
                Some(v) => {
                    self.labeled += 1;
                    *self.histogram.entry(*v).or_insert(0) += 1;
                }
                None => self.unlabeled += 1,
            }
        }
    }
}

/// Counts a dataset's labels, reading the label column alone.
pub fn label_counts(ds: &Dataset) -> Result<LabelCounts> {
    let mut counts = LabelCounts::default();
    for chunk in ds.chunks() {
        counts.add(&read_labels(ds, chunk)?.0);
    }
    Ok(counts)
}

/// Reads the whole dataset and summarises it.
pub fn inspect(ds: &Dataset) -> Result<Inspection> {
    let mut counts = LabelCounts::default();
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for chunk in ds.chunks() {
        let data = read_chunk(ds, chunk)?;
        counts.add(&data.labels);
        let (a, b) = match &data.pixels {
            Pixels::Uint8(v) => {
                let (a, b) = v
                    .iter()
                    .fold((u8::MAX, u8::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
                (f32::from(a) / 255.0, f32::from(b) / 255.0)
            }
            Pixels::Float32(v) => v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                    (a.min(*x), b.max(*x))
                }),
        };
        lo = lo.min(a);
        hi = hi.max(b);
    }
    let schema = ds.schema();
    Ok(Inspection {
        path: ds.spec().to_string(),
        files: ds.files().len(),
        rows: ds.rows(),
        row_groups: ds.chunks().len(),
        shape: schema.shape.clone(),
        pixel_type: schema.pixel,
        has_id: schema.has_id,
        labeled: counts.labeled,
        unlabeled: counts.unlabeled,
        label_histogram: counts.histogram,
        x_min: lo,
        x_max: hi,
    })
}
