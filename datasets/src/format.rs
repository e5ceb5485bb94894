//! The elbo Parquet dataset format: column names, types and metadata (see datasets/README.md).

use std::path::Path;

use arrow_schema::{DataType, Field, Schema as ArrowSchema};
use serde::Serialize;

use crate::error::{DataError, Result};

/// The examples: `FixedSizeList<UInt8>` (scaled to [0, 1] on read) or `FixedSizeList<Float32>`.
pub const X_COLUMN: &str = "x";
/// Optional class label: nullable `Int64`, null for unlabeled rows, otherwise ≥ 0.
pub const LABEL_COLUMN: &str = "label";
/// Optional stable row id: `UInt64`.
pub const ID_COLUMN: &str = "id";
/// Key-value metadata key holding the example shape, e.g. `1,28,28`.
pub const SHAPE_KEY: &str = "elbo.shape";

/// Element type of the `x` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelType {
    /// Unsigned bytes, divided by 255 on read.
    Uint8,
    /// 32-bit floats, read as they are (must be finite).
    Float32,
}

impl PixelType {
    /// The Arrow element type.
    pub fn arrow_type(self) -> DataType {
        match self {
            PixelType::Uint8 => DataType::UInt8,
            PixelType::Float32 => DataType::Float32,
        }
    }
}

/// What a dataset's files hold, checked to be the same in every file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataSchema {
    /// Shape of one example (e.g. `[1, 28, 28]`); its product is `dim`.
    pub shape: Vec<usize>,
    /// Number of values per example.
    pub dim: usize,
    /// Element type of `x`.
    pub pixel: PixelType,
    /// Whether the files have a `label` column.
    pub has_label: bool,
    /// Whether the files have an `id` column.
    pub has_id: bool,
}

impl DataSchema {
    /// Reads and checks the schema of one file from its Arrow schema and key-value metadata.
    /// A file without `elbo.shape` metadata holds flat vectors: its shape is `[dim]`.
    pub fn from_arrow(path: &Path, schema: &ArrowSchema, shape_meta: Option<&str>) -> Result<Self> {
        let bad = |message: String| DataError::Schema {
            path: path.to_path_buf(),
            message,
        };
        let expected_x = "FixedSizeList<UInt8> or FixedSizeList<Float32>";
        let x = schema.field_with_name(X_COLUMN).map_err(|_| {
            bad(format!(
                "no column `{X_COLUMN}`: expected a column `{X_COLUMN}` of type {expected_x}"
            ))
        })?;
        let (pixel, dim) = match x.data_type() {
            DataType::FixedSizeList(item, n) if *n > 0 => match item.data_type() {
                DataType::UInt8 => (PixelType::Uint8, *n as usize),
                DataType::Float32 => (PixelType::Float32, *n as usize),
                other => {
                    return Err(bad(format!(
                        "column `{X_COLUMN}` has type FixedSizeList<{other}>, expected {expected_x}"
                    )))
                }
            },
            other => {
                return Err(bad(format!(
                    "column `{X_COLUMN}` has type {other}, expected {expected_x}"
                )))
            }
        };
        let shape = match shape_meta {
            None => vec![dim],
            Some(text) => parse_shape(text).ok_or_else(|| {
                bad(format!(
                    "metadata `{SHAPE_KEY}` is {text:?}, expected positive integers separated by commas, e.g. 1,28,28"
                ))
            })?,
        };
        if checked_numel(&shape) != Some(dim) {
            let count = checked_numel(&shape).map_or("too many".to_string(), |n| n.to_string());
            return Err(bad(format!(
                "metadata `{SHAPE_KEY}` = {} has {count} elements, but the lists of column `{X_COLUMN}` have {dim}",
                join_shape(&shape)
            )));
        }
        let has_label = optional_column(schema, LABEL_COLUMN, &DataType::Int64, &bad)?;
        let has_id = optional_column(schema, ID_COLUMN, &DataType::UInt64, &bad)?;
        Ok(DataSchema {
            shape,
            dim,
            pixel,
            has_label,
            has_id,
        })
    }

    /// Describes the first difference between two schemas, if any.
    pub fn difference(&self, other: &DataSchema) -> Option<String> {
        if self.pixel != other.pixel || self.dim != other.dim {
            return Some(format!(
                "column `{X_COLUMN}` holds {:?}×{} here but {:?}×{} there",
                other.pixel, other.dim, self.pixel, self.dim
            ));
        }
        if self.shape != other.shape {
            return Some(format!(
                "shape {} here but {} there",
                join_shape(&other.shape),
                join_shape(&self.shape)
            ));
        }
        for (name, a, b) in [
            (LABEL_COLUMN, self.has_label, other.has_label),
            (ID_COLUMN, self.has_id, other.has_id),
        ] {
            if a != b {
                let has = |v: bool| if v { "has" } else { "lacks" };
                return Some(format!(
                    "column `{name}`: this file {} it, the first {} it",
                    has(b),
                    has(a)
                ));
            }
        }
        None
    }

    /// The Arrow field of column `x` for this schema.
    pub fn x_field(&self) -> Field {
        let item = Field::new("item", self.pixel.arrow_type(), false);
        Field::new(
            X_COLUMN,
            DataType::FixedSizeList(item.into(), self.dim as i32),
            false,
        )
    }
}

fn optional_column(
    schema: &ArrowSchema,
    name: &str,
    expected: &DataType,
    bad: &dyn Fn(String) -> DataError,
) -> Result<bool> {
    match schema.field_with_name(name) {
        Err(_) => Ok(false),
        Ok(f) if f.data_type() == expected => Ok(true),
        Ok(f) => Err(bad(format!(
            "column `{name}` has type {}, expected {expected}",
            f.data_type()
        ))),
    }
}

/// Parses `1,28,28` into `[1, 28, 28]`; `None` unless every part is a positive integer.
pub fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let dims: Option<Vec<usize>> = text
        .split(',')
        .map(|p| p.trim().parse::<usize>().ok().filter(|d| *d > 0))
        .collect();
    dims.filter(|d| !d.is_empty())
}

/// Most values one example may hold (2^28: a 16k × 16k image), so that a size read from a file
/// header can never overflow or ask for an absurd allocation.
pub const MAX_EXAMPLE_VALUES: usize = 1 << 28;

/// The number of values of an example of this shape, if it is at most [`MAX_EXAMPLE_VALUES`].
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n <= MAX_EXAMPLE_VALUES)
}

/// Formats a shape as `1,28,28`.
pub fn join_shape(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
