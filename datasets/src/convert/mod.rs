//! Converters from common image formats to the elbo Parquet format. Every converter validates
//! its input fully, writes through [`DatasetWriter`](crate::writer::DatasetWriter) and so leaves
//! no partial output file behind on error.

mod csv;
mod idx;
mod npy;

pub use self::csv::{convert_csv, CsvHeader, CsvOptions};
pub use idx::convert_idx;
pub use npy::convert_npy;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{DataError, Result};

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConvertSummary {
    /// Rows written.
    pub rows: u64,
    /// Example shape.
    pub shape: Vec<usize>,
    /// Rows with a label.
    pub labeled: u64,
}

/// Opens a file for reading, transparently gunzipping it when it starts with the gzip magic.
pub(crate) fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::GzDecoder::new(reader),
        )))
    } else {
        Ok(Box::new(reader))
    }
}

/// Checks that `shape`, if given, has `dim` elements; returns the shape to record.
pub(crate) fn shape_for(dim: usize, shape: Option<&[usize]>, source: &Path) -> Result<Vec<usize>> {
    match shape {
        None => Ok(vec![dim]),
        Some(s) if crate::format::checked_numel(s) == Some(dim) => Ok(s.to_vec()),
        Some(s) => Err(DataError::input(
            source,
            format!(
                "--shape {} does not have {dim} elements, the values per example",
                crate::format::join_shape(s)
            ),
        )),
    }
}
