//! Opening a dataset: a file, a directory of `*.parquet` files, or a glob; footers only.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};

use crate::error::{guard_decoder, DataError, Result};
use crate::format::{DataSchema, SHAPE_KEY};
use crate::source::{self, FOOTER_TAIL};

/// One unit of sharding: a row group of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the file in [`Dataset::files`].
    pub file: usize,
    /// Row group within the file.
    pub row_group: usize,
    /// Rows in the row group.
    pub rows: u64,
    /// Position of the row group's first row within its file.
    pub first_row: u64,
}

/// One file of a dataset with its parsed footer.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its footer, parsed once and reused for every row group read.
    pub metadata: ArrowReaderMetadata,
}

/// An opened dataset: its files (sorted by path), their common schema and their chunks.
#[derive(Debug, Clone)]
pub struct Dataset {
    spec: String,
    files: Vec<DataFile>,
    schema: DataSchema,
    chunks: Vec<Chunk>,
    rows: u64,
}

impl Dataset {
    /// Opens a dataset given as a Parquet file, a directory (its `*.parquet` files) or a glob.
    /// Reads only the footers; checks that every file follows the format with one schema and
    /// that there is at least one row.
    pub fn open(spec: &str) -> Result<Self> {
        let paths = resolve(spec)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut schema: Option<DataSchema> = None;
        let mut chunks = Vec::new();
        for (index, path) in paths.into_iter().enumerate() {
            let (metadata, file_schema) = guard_decoder(&path, || open_file(&path))?;
            match &schema {
                None => schema = Some(file_schema),
                Some(first) => {
                    if let Some(what) = first.difference(&file_schema) {
                        return Err(DataError::SchemaMismatch {
                            path,
                            first: files
                                .first()
                                .map(|f: &DataFile| f.path.clone())
                                .unwrap_or_default(),
                            what,
                        });
                    }
                }
            }
            let mut first_row = 0u64;
            for (row_group, rg) in metadata.metadata().row_groups().iter().enumerate() {
                let rows = u64::try_from(rg.num_rows()).map_err(|_| DataError::Schema {
                    path: path.clone(),
                    message: format!("row group {row_group} has a negative row count"),
                })?;
                if rows > 0 {
                    chunks.push(Chunk {
                        file: index,
                        row_group,
                        rows,
                        first_row,
                    });
                }
                first_row = first_row
                    .checked_add(rows)
                    .ok_or_else(|| DataError::Schema {
                        path: path.clone(),
                        message: format!(
                            "row group {row_group}'s row count ({rows}) overflows the file's total"
                        ),
                    })?;
            }
            files.push(DataFile { path, metadata });
        }
        let rows = chunks
            .iter()
            .try_fold(0u64, |sum, c| sum.checked_add(c.rows))
            .ok_or_else(|| {
                DataError::Invalid(format!(
                    "{spec}: the files' row counts add up to more than 2^64 rows"
                ))
            })?;
        if rows == 0 {
            return Err(DataError::Empty {
                spec: spec.to_string(),
                message: format!(
                    "the dataset has no rows ({} file(s), all empty); expected at least one row",
                    files.len()
                ),
            });
        }
        Ok(Dataset {
            spec: spec.to_string(),
            files,
            schema: schema.expect("at least one file was resolved"),
            chunks,
            rows,
        })
    }

    /// The path, directory or glob the dataset was opened from.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The files, sorted by path.
    pub fn files(&self) -> &[DataFile] {
        &self.files
    }

    /// The common schema.
    pub fn schema(&self) -> &DataSchema {
        &self.schema
    }

    /// The non-empty row groups, in file order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Total rows.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

fn is_glob(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

/// Resolves a dataset spec to its sorted list of files.
fn resolve(spec: &str) -> Result<Vec<PathBuf>> {
    let empty = |message: String| DataError::Empty {
        spec: spec.to_string(),
        message,
    };
    let mut paths: Vec<PathBuf> = if is_glob(spec) {
        let entries = glob::glob(spec)
            .map_err(|e| DataError::Invalid(format!("{spec}: not a valid glob pattern: {e}")))?;
        entries
            .map(|e| {
                e.map_err(|e| {
                    let path = e.path().to_path_buf();
                    DataError::io(path, e.into())
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.is_file())
            .collect()
    } else {
        let path = Path::new(spec);
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| DataError::io(path, e))?;
            let mut found = Vec::new();
            for entry in entries {
                let p = entry.map_err(|e| DataError::io(path, e))?.path();
                if p.is_file() && p.extension().is_some_and(|e| e == "parquet") {
                    found.push(p);
                }
            }
            found
        } else {
            vec![path.to_path_buf()]
        }
    };
    if paths.is_empty() {
        return Err(empty(if is_glob(spec) {
            "no files match this glob; expected at least one Parquet file".into()
        } else {
            "the directory holds no *.parquet files; expected at least one".into()
        }));
    }
    paths.sort();
    Ok(paths)
}

fn open_file(path: &Path) -> Result<(ArrowReaderMetadata, DataSchema)> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    check_footer(path, &file)?;
    let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| {
        DataError::NotParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let shape = metadata
        .schema()
        .metadata()
        .get(SHAPE_KEY)
        .cloned()
        .or_else(|| {
            metadata
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|e| e.key == SHAPE_KEY))
                .and_then(|e| e.value.clone())
        });
    let schema = DataSchema::from_arrow(path, metadata.schema(), shape.as_deref())?;
    Ok((metadata, schema))
}

/// Checks the footer's Thrift structure before the decoder parses it (see `source.rs`: the
/// decoder's skip of unknown fields is not bounded by the footer's length). A file too short
/// for a footer, without the magic or with a length past its start is left to the decoder,
/// which names what is wrong.
fn check_footer(path: &Path, file: &File) -> Result<()> {
    let io = |e| DataError::io(path, e);
    let len = file.metadata().map_err(io)?.len();
    let Some(tail_at) = len.checked_sub(FOOTER_TAIL) else {
        return Ok(());
    };
    let mut reader = file;
    let mut tail = [0u8; FOOTER_TAIL as usize];
    reader.seek(SeekFrom::Start(tail_at)).map_err(io)?;
    reader.read_exact(&mut tail).map_err(io)?;
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if &tail[4..] != b"PAR1" || footer_len > tail_at {
        return Ok(());
    }
    let mut footer = vec![0u8; footer_len as usize];
    reader
        .seek(SeekFrom::Start(tail_at - footer_len))
        .map_err(io)?;
    reader.read_exact(&mut footer).map_err(io)?;
    source::check_footer(&mut &footer[..]).map_err(|e| DataError::NotParquet {
        path: path.to_path_buf(),
        message: format!("corrupt footer: {e}"),
    })
}
