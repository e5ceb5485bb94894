//! Writing datasets atomically: a temporary file beside the target, fsync, rename on `finish`.
//! Dropping an unfinished writer removes the temporary file, so a failed conversion leaves no
//! partial output behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tempfile::NamedTempFile;

use crate::error::{DataError, Result};
use crate::format::{join_shape, DataSchema, PixelType, ID_COLUMN, LABEL_COLUMN, SHAPE_KEY};

/// Default rows per row group (the unit of sharding).
pub const DEFAULT_ROW_GROUP_SIZE: usize = 4096;

/// What a written dataset holds.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    /// Example shape and element type; `has_label`/`has_id` choose the optional columns.
    pub schema: DataSchema,
    /// Extra `Float32` columns (e.g. generative factors), by name.
    pub extra_columns: Vec<String>,
    /// Rows per row group.
    pub row_group_size: usize,
}

/// Rows to append: `x` holds `rows × dim` values.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// Example values.
    pub x: PixelSlice<'a>,
    /// Labels, if the spec has a label column.
    pub labels: Option<&'a [Option<i64>]>,
    /// Ids, if the spec has an id column.
    pub ids: Option<&'a [u64]>,
    /// Values of each extra column, in spec order.
    pub extra: &'a [&'a [f32]],
}

/// Borrowed example values.
#[derive(Debug, Clone, Copy)]
pub enum PixelSlice<'a> {
    /// Bytes.
    Uint8(&'a [u8]),
    /// Floats (must be finite).
    Float32(&'a [f32]),
}

/// An open dataset file being written.
pub struct DatasetWriter {
    target: PathBuf,
    spec: WriterSpec,
    schema: Arc<Schema>,
    writer: ArrowWriter<NamedTempFile>,
    rows: u64,
}

impl DatasetWriter {
    /// Starts writing `target` (created on [`finish`](Self::finish), replacing any file there).
    pub fn create(target: &Path, spec: WriterSpec) -> Result<Self> {
        if spec.row_group_size == 0 {
            return Err(DataError::Invalid(
                "row group size must be at least 1".into(),
            ));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".elbo-partial-")
            .suffix(".parquet")
            .permissions(crate::fsutil::shared_file_permissions())
            .tempfile_in(&dir)
            .map_err(|e| DataError::io(&dir, e))?;
        let mut fields = vec![spec.schema.x_field()];
        if spec.schema.has_label {
            fields.push(Field::new(LABEL_COLUMN, DataType::Int64, true));
        }
        if spec.schema.has_id {
            fields.push(Field::new(ID_COLUMN, DataType::UInt64, false));
        }
        for name in &spec.extra_columns {
            fields.push(Field::new(name, DataType::Float32, false));
        }
        let shape = join_shape(&spec.schema.shape);
        let metadata: HashMap<String, String> = [(SHAPE_KEY.to_string(), shape.clone())].into();
        let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
        let props = WriterProperties::builder()
            .set_key_value_metadata(Some(vec![KeyValue::new(SHAPE_KEY.to_string(), shape)]))
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(spec.row_group_size))
            .build();
        let writer = ArrowWriter::try_new(tmp, schema.clone(), Some(props)).map_err(|e| {
            DataError::Invalid(format!("{}: cannot start writing: {e}", target.display()))
        })?;
        Ok(DatasetWriter {
            target: target.to_path_buf(),
            spec,
            schema,
            writer,
            rows: 0,
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends rows.
    pub fn write(&mut self, rows: Rows<'_>) -> Result<()> {
        let dim = self.spec.schema.dim;
        let (values, len): (ArrayRef, usize) = match (rows.x, self.spec.schema.pixel) {
            (PixelSlice::Uint8(v), PixelType::Uint8) => {
                (Arc::new(UInt8Array::from(v.to_vec())), v.len())
            }
            (PixelSlice::Float32(v), PixelType::Float32) => {
                if let Some(i) = v.iter().position(|f| !f.is_finite()) {
                    return Err(DataError::Invalid(format!(
                        "{}: row {} holds {} at element {}; expected finite values",
                        self.target.display(),
                        self.rows + (i / dim) as u64,
                        v[i],
                        i % dim
                    )));
                }
                (Arc::new(Float32Array::from(v.to_vec())), v.len())
            }
            _ => {
                return Err(DataError::Invalid(
                    "pixel type differs from the writer's schema".into(),
                ))
            }
        };
        if len % dim != 0 {
            return Err(DataError::Invalid(format!(
                "{len} values is not a whole number of {dim}-value rows"
            )));
        }
        let n = len / dim;
        let item = Arc::new(Field::new(
            "item",
            self.spec.schema.pixel.arrow_type(),
            false,
        ));
        let x = FixedSizeListArray::try_new(item, dim as i32, values, None)
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        let mut columns: Vec<ArrayRef> = vec![Arc::new(x)];
        let check_len = |what: &str, got: usize| {
            if got == n {
                Ok(())
            } else {
                Err(DataError::Invalid(format!(
                    "{what}: {got} values for {n} rows"
                )))
            }
        };
        if self.spec.schema.has_label {
            let labels = rows
                .labels
                .ok_or_else(|| DataError::Invalid("labels missing".into()))?;
            check_len("labels", labels.len())?;
            if let Some((i, l)) = labels
                .iter()
                .enumerate()
                .find(|(_, l)| l.is_some_and(|v| v < 0))
            {
                return Err(DataError::Invalid(format!(
                    "{}: row {} has label {}, expected a label ≥ 0",
                    self.target.display(),
                    self.rows + i as u64,
                    l.unwrap_or_default()
                )));
            }
            columns.push(Arc::new(Int64Array::from(labels.to_vec())));
        }
        if self.spec.schema.has_id {
            let ids = rows
                .ids
                .ok_or_else(|| DataError::Invalid("ids missing".into()))?;
            check_len("ids", ids.len())?;
            columns.push(Arc::new(UInt64Array::from(ids.to_vec())));
        }
        if rows.extra.len() != self.spec.extra_columns.len() {
            return Err(DataError::Invalid(format!(
                "{} extra columns given, the spec has {}",
                rows.extra.len(),
                self.spec.extra_columns.len()
            )));
        }
        for col in rows.extra {
            check_len("extra column", col.len())?;
            columns.push(Arc::new(Float32Array::from(col.to_vec())));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        self.writer
            .write(&batch)
            .map_err(|e| DataError::Invalid(format!("{}: {e}", self.target.display())))?;
        self.rows += n as u64;
        Ok(())
    }

    /// Completes the file: footer, fsync, rename to the target. Returns the rows written.
    pub fn finish(self) -> Result<u64> {
        let target = self.target;
        let tmp = self
            .writer
            .into_inner()
            .map_err(|e| DataError::Invalid(format!("{}: {e}", target.display())))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| DataError::io(&target, e))?;
        tmp.persist(&target)
            .map_err(|e| DataError::io(&target, e.error))?;
        crate::fsutil::sync_parent_dir(&target)?;
        Ok(self.rows)
    }
}
