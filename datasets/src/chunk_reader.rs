//! Decoding one row group (chunk) into checked, flat columns.

use std::fs::File;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::dataset::{Chunk, Dataset};
use crate::error::{guard_decoder, DataError, Result};
use crate::format::{PixelType, ID_COLUMN, LABEL_COLUMN, X_COLUMN};
use crate::source::DataSource;

/// Example values of a decoded chunk, row-major, `dim` per row.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// Bytes, to be divided by 255.
    Uint8(Vec<u8>),
    /// Finite floats.
    Float32(Vec<f32>),
}

/// A decoded, validated chunk.
#[derive(Debug, Clone)]
pub struct ChunkData {
    /// The examples.
    pub pixels: Pixels,
    /// Labels (`None` = unlabeled), one per row; all `None` without a label column.
    pub labels: Vec<Option<i64>>,
    /// Stable row ids.
    pub ids: Vec<u64>,
}

/// `b / 255` for every byte value, correctly rounded.
static UNIT_BYTES: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b as f32 / 255.0;
        b += 1;
    }
    table
};

/// Bits of a derived row id given to the row position; the file index takes the rest.
pub const DERIVED_ID_ROW_BITS: u32 = 40;

impl ChunkData {
    /// Writes row `row` as f32 values in [0, 1] (for uint8) into `out`.
    pub fn copy_row(&self, row: usize, dim: usize, out: &mut [f32]) {
        let range = row * dim..(row + 1) * dim;
        match &self.pixels {
            Pixels::Uint8(v) => {
                for (o, b) in out.iter_mut().zip(&v[range]) {
                    *o = UNIT_BYTES[usize::from(*b)];
                }
            }
            Pixels::Float32(v) => out.copy_from_slice(&v[range]),
        }
    }

    /// Rows in the chunk.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }
}

/// Reads and validates one chunk of a dataset: only columns `x`, `label` and `id`.
pub fn read_chunk(ds: &Dataset, chunk: &Chunk) -> Result<ChunkData> {
    guard_decoder(&ds.files()[chunk.file].path, || {
        read_chunk_unguarded(ds, chunk)
    })
}

fn read_chunk_unguarded(ds: &Dataset, chunk: &Chunk) -> Result<ChunkData> {
    let pixels = read_x(ds, chunk).map_err(|m| value_error(ds, chunk, X_COLUMN, m))?;
    let (labels, ids) = read_labels_unguarded(ds, chunk)?;
    Ok(ChunkData {
        pixels,
        labels,
        ids,
    })
}

fn value_error(ds: &Dataset, chunk: &Chunk, column: &'static str, message: String) -> DataError {
    DataError::Value {
        path: ds.files()[chunk.file].path.clone(),
        row_group: chunk.row_group,
        column,
        message,
    }
}

/// Reads and validates the labels and ids of one chunk (no pixels).
pub fn read_labels(ds: &Dataset, chunk: &Chunk) -> Result<(Vec<Option<i64>>, Vec<u64>)> {
    guard_decoder(&ds.files()[chunk.file].path, || {
        read_labels_unguarded(ds, chunk)
    })
}

fn read_labels_unguarded(ds: &Dataset, chunk: &Chunk) -> Result<(Vec<Option<i64>>, Vec<u64>)> {
    let file_meta = &ds.files()[chunk.file];
    let path = &file_meta.path;
    let value_err = |column: &'static str, message: String| value_error(ds, chunk, column, message);
    let rows = chunk.rows as usize;
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let arrow_schema = file_meta.metadata.schema().clone();
    let roots: Vec<usize> = [LABEL_COLUMN, ID_COLUMN]
        .iter()
        .filter_map(|c| arrow_schema.index_of(c).ok())
        .collect();
    let mut labels = Vec::with_capacity(rows);
    let mut ids = Vec::with_capacity(rows);
    if !roots.is_empty() {
        let mask = ProjectionMask::roots(
            file_meta.metadata.metadata().file_metadata().schema_descr(),
            roots,
        );
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(
            DataSource::new(file),
            file_meta.metadata.clone(),
        )
        .with_row_groups(vec![chunk.row_group])
        .with_projection(mask)
        .with_batch_size(rows)
        .build()
        .map_err(|e| value_err(LABEL_COLUMN, format!("cannot read: {e}")))?;
        for batch in reader {
            let batch: RecordBatch =
                batch.map_err(|e| value_err(LABEL_COLUMN, format!("cannot decode: {e}")))?;
            if let Some(col) = batch.column_by_name(LABEL_COLUMN) {
                for (i, l) in col.as_primitive::<Int64Type>().iter().enumerate() {
                    if let Some(v) = l.filter(|v| *v < 0) {
                        let at = chunk.first_row + labels.len() as u64 + i as u64;
                        return Err(value_err(
                            LABEL_COLUMN,
                            format!("row {at} has label {v}, expected a label ≥ 0 (or null for unlabeled)"),
                        ));
                    }
                }
                labels.extend(col.as_primitive::<Int64Type>().iter());
            }
            if let Some(col) = batch.column_by_name(ID_COLUMN) {
                let col = col.as_primitive::<UInt64Type>();
                if col.null_count() > 0 {
                    return Err(value_err(
                        ID_COLUMN,
                        "null ids; expected an id on every row".into(),
                    ));
                }
                ids.extend_from_slice(col.values());
            }
        }
    }
    if !ds.schema().has_label {
        labels = vec![None; rows];
    }
    if !ds.schema().has_id {
        let base = (chunk.file as u64) << DERIVED_ID_ROW_BITS;
        ids = (chunk.first_row..chunk.first_row + chunk.rows)
            .map(|r| base | r)
            .collect();
    }
    if labels.len() != rows || ids.len() != rows {
        return Err(value_err(
            LABEL_COLUMN,
            format!(
                "decoded {} labels and {} ids, the footer says {rows} rows",
                labels.len(),
                ids.len()
            ),
        ));
    }
    Ok((labels, ids))
}

/// Decodes column `x` of a chunk with Parquet's column reader, straight into flat values:
/// a `FixedSizeList` of required values needs none of Arrow's list assembly, only a check that
/// no level marks a null or empty list and that every row holds `dim` values.
fn read_x(ds: &Dataset, chunk: &Chunk) -> Result<Pixels, String> {
    let file_meta = &ds.files()[chunk.file];
    let file = File::open(&file_meta.path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(DataSource::new(file)).map_err(|e| e.to_string())?;
    let row_group = reader
        .get_row_group(chunk.row_group)
        .map_err(|e| e.to_string())?;
    let schema = row_group.metadata().schema_descr_ptr();
    let leaf = (0..schema.num_columns())
        .find(|i| schema.column(*i).path().parts().first().map(String::as_str) == Some(X_COLUMN))
        .ok_or("no leaf column under `x`")?;
    let max_def = schema.column(leaf).max_def_level();
    let dim = ds.schema().dim;
    let rows = chunk.rows as usize;
    let column = row_group
        .get_column_reader(leaf)
        .map_err(|e| e.to_string())?;
    let mut levels = Levels {
        rows,
        dim,
        max_def,
        first_row: chunk.first_row,
        def: Vec::new(),
        rep: Vec::new(),
    };
    let pixels =
        match (column, ds.schema().pixel) {
            (ColumnReader::Int32ColumnReader(mut r), PixelType::Uint8) => {
                let mut out = Vec::with_capacity(rows * dim);
                let mut values: Vec<i32> = Vec::new();
                levels.read_all(
                    &mut values,
                    |def, rep, values| r.read_records(DECODE_ROWS, Some(def), Some(rep), values),
                    |values| {
                        for v in values.iter() {
                            out.push(u8::try_from(*v).map_err(|_| {
                                format!("value {v} outside 0..=255 in a UInt8 column")
                            })?);
                        }
                        Ok(())
                    },
                )?;
                Pixels::Uint8(out)
            }
            (ColumnReader::FloatColumnReader(mut r), PixelType::Float32) => {
                let mut out: Vec<f32> = Vec::with_capacity(rows * dim);
                let mut values: Vec<f32> = Vec::new();
                levels.read_all(
                    &mut values,
                    |def, rep, values| r.read_records(DECODE_ROWS, Some(def), Some(rep), values),
                    |values| {
                        if let Some(i) = values.iter().position(|f| !f.is_finite()) {
                            let at = out.len() + i;
                            return Err(format!(
                                "row {} holds {} at element {}; expected finite values",
                                chunk.first_row + (at / dim) as u64,
                                values[i],
                                at % dim
                            ));
                        }
                        out.extend_from_slice(values);
                        Ok(())
                    },
                )?;
                Pixels::Float32(out)
            }
            _ => return Err("physical type does not match the Arrow schema".into()),
        };
    Ok(pixels)
}

/// Rows decoded per call of the column reader: its value and level buffers stay small and
/// are reused, instead of three row-group-sized allocations per chunk.
const DECODE_ROWS: usize = 512;

/// What one column decode expects, and its reused level buffers.
struct Levels {
    rows: usize,
    dim: usize,
    max_def: i16,
    first_row: u64,
    def: Vec<i16>,
    rep: Vec<i16>,
}

impl Levels {
    /// Reads `rows` records slice by slice with `read`, checks levels and counts, and hands
    /// each slice's values to `take`.
    fn read_all<T>(
        &mut self,
        values: &mut Vec<T>,
        mut read: impl FnMut(
            &mut Vec<i16>,
            &mut Vec<i16>,
            &mut Vec<T>,
        ) -> parquet::errors::Result<(usize, usize, usize)>,
        mut take: impl FnMut(&[T]) -> Result<(), String>,
    ) -> Result<(), String> {
        let (rows, dim, max_def, first_row) = (self.rows, self.dim, self.max_def, self.first_row);
        let mut done = 0;
        while done < rows {
            self.def.clear();
            self.rep.clear();
            values.clear();
            let (records, _, _) = read(&mut self.def, &mut self.rep, values)
                .map_err(|e| format!("cannot decode: {e}"))?;
            if records == 0 {
                return Err(format!("decoded {done} rows, the footer says {rows}"));
            }
            if let Some(i) = self.def.iter().position(|d| *d != max_def) {
                return Err(format!(
                    "a null or empty example near row {}; expected {dim} values in every row",
                    first_row + (done + i / dim) as u64
                ));
            }
            if values.len() != records * dim {
                return Err(format!(
                    "rows {}..{} hold {} values; expected {dim} per row",
                    first_row + done as u64,
                    first_row + (done + records) as u64,
                    values.len()
                ));
            }
            take(values)?;
            done += records;
        }
        Ok(())
    }
}
