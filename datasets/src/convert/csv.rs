//! CSV files: one example per line, pixel columns plus an optional label column.

use std::path::Path;

use super::{open_maybe_gz, shape_for, ConvertSummary};
use crate::error::{DataError, Result};
use crate::format::{DataSchema, PixelType};
use crate::writer::{DatasetWriter, PixelSlice, Rows, WriterSpec};

/// Whether the first line is a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvHeader {
    /// A header if any field of the first line is not a number.
    Auto,
    /// The first line is a header.
    Yes,
    /// The first line is data.
    No,
}

/// Options of a CSV conversion.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    /// Header handling.
    pub header: CsvHeader,
    /// The label column, by header name or 0-based index. `None`: a column named `label` if the
    /// header has one, otherwise no labels. An empty label field is an unlabeled row.
    pub label_column: Option<String>,
    /// Element type of the pixels: uint8 (integers 0–255) or float32.
    pub pixel: PixelType,
    /// Example shape; by default a flat vector.
    pub shape: Option<Vec<usize>>,
    /// Rows per row group.
    pub row_group_size: usize,
}

/// Converts a CSV file (plain or gzipped) to Parquet at `out`.
pub fn convert_csv(input: &Path, out: &Path, opts: &CsvOptions) -> Result<ConvertSummary> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(open_maybe_gz(input)?);
    let mut records = reader.records();
    let bad =
        |line: u64, message: String| DataError::input(input, format!("line {line}: {message}"));
    let first = match records.next() {
        None => {
            return Err(DataError::input(
                input,
                "is empty; expected at least one row",
            ))
        }
        Some(r) => r.map_err(|e| DataError::input(input, e.to_string()))?,
    };
    let is_header = match opts.header {
        CsvHeader::Yes => true,
        CsvHeader::No => false,
        CsvHeader::Auto => first.iter().any(|f| f.trim().parse::<f64>().is_err()),
    };
    let names: Option<Vec<String>> =
        is_header.then(|| first.iter().map(|f| f.trim().to_string()).collect());
    let width = first.len();
    let label_index = match (&opts.label_column, &names) {
        (None, Some(names)) => names.iter().position(|n| n == "label"),
        (None, None) => None,
        (Some(col), names) => Some(
            names
                .as_ref()
                .and_then(|n| n.iter().position(|n| n == col))
                .or_else(|| col.parse::<usize>().ok().filter(|i| *i < width))
                .ok_or_else(|| {
                    DataError::input(
                        input,
                        format!("no label column {col:?}: expected a header name or a 0-based index below {width}"),
                    )
                })?,
        ),
    };
    let dim = width - usize::from(label_index.is_some());
    if dim == 0 {
        return Err(DataError::input(input, "has no pixel columns"));
    }
    let shape = shape_for(dim, opts.shape.as_deref(), input)?;
    let spec = WriterSpec {
        schema: DataSchema {
            shape: shape.clone(),
            dim,
            pixel: opts.pixel,
            has_label: label_index.is_some(),
            has_id: true,
        },
        extra_columns: vec![],
        row_group_size: opts.row_group_size,
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    let mut bytes: Vec<u8> = Vec::new();
    let mut floats: Vec<f32> = Vec::new();
    let mut labels: Vec<Option<i64>> = Vec::new();
    let mut labeled = 0u64;
    let mut rows = 0u64;
    let data_lines = (!is_header).then_some(Ok(first)).into_iter().chain(records);
    let mut flush =
        |bytes: &mut Vec<u8>, floats: &mut Vec<f32>, labels: &mut Vec<Option<i64>>, rows: u64| {
            let pending = match opts.pixel {
                PixelType::Uint8 => bytes.len(),
                PixelType::Float32 => floats.len(),
            } / dim;
            let ids: Vec<u64> = (rows - pending as u64..rows).collect();
            let x = match opts.pixel {
                PixelType::Uint8 => PixelSlice::Uint8(bytes),
                PixelType::Float32 => PixelSlice::Float32(floats),
            };
            let res = writer.write(Rows {
                x,
                labels: label_index.map(|_| labels.as_slice()),
                ids: Some(&ids),
                extra: &[],
            });
            bytes.clear();
            floats.clear();
            labels.clear();
            res
        };
    for record in data_lines {
        let record = record.map_err(|e| DataError::input(input, e.to_string()))?;
        let line = record.position().map_or(rows + 1, |p| p.line());
        if record.len() != width {
            return Err(bad(
                line,
                format!(
                    "{} fields, expected {width} like the first line",
                    record.len()
                ),
            ));
        }
        for (i, field) in record.iter().enumerate() {
            let field = field.trim();
            if Some(i) == label_index {
                if field.is_empty() {
                    labels.push(None);
                    continue;
                }
                match field.parse::<i64>() {
                    Ok(v) if v >= 0 => {
                        labels.push(Some(v));
                        labeled += 1;
                    }
                    _ => {
                        return Err(bad(
                            line,
                            format!(
                                "label {field:?}: expected an integer ≥ 0, or empty for unlabeled"
                            ),
                        ))
                    }
                }
                continue;
            }
            match opts.pixel {
                PixelType::Uint8 => bytes.push(field.parse::<u8>().map_err(|_| {
                    bad(line, format!("column {i}: {field:?} is not an integer in 0..=255 (use --pixel-type float32 for real values)"))
                })?),
                PixelType::Float32 => match field.parse::<f32>() {
                    Ok(v) if v.is_finite() => floats.push(v),
                    _ => return Err(bad(line, format!("column {i}: {field:?} is not a finite number"))),
                },
            }
        }
        rows += 1;
        if rows % opts.row_group_size as u64 == 0 {
            flush(&mut bytes, &mut floats, &mut labels, rows)?;
        }
    }
    if rows == 0 {
        return Err(DataError::input(
            input,
            "has a header but no data rows; expected at least one",
        ));
    }
    if rows % opts.row_group_size as u64 != 0 {
        flush(&mut bytes, &mut floats, &mut labels, rows)?;
    }
    writer.finish()?;
    Ok(ConvertSummary {
        rows,
        shape,
        labeled,
    })
}
