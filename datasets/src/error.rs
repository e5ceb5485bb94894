//! Errors of the data layer. Each names the file, and the row group, column or line where known.

use std::path::PathBuf;

/// Result alias of the data layer.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, writing or converting a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The operating system refused a file operation.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not Parquet, or is truncated.
    #[error("{path}: not a readable Parquet file ({message}); expected a complete Parquet file")]
    NotParquet {
        /// The file.
        path: PathBuf,
        /// What the Parquet reader said.
        message: String,
    },
    /// The file's schema does not follow the elbo dataset format.
    #[error("{path}: {message}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        message: String,
    },
    /// Two files of one dataset have different schemas.
    #[error("{path}: schema differs from {first} in the same dataset: {what}")]
    SchemaMismatch {
        /// The offending file.
        path: PathBuf,
        /// The first file of the dataset, which sets the schema.
        first: PathBuf,
        /// What differs.
        what: String,
    },
    /// A bad value inside a row group.
    #[error("{path}, row group {row_group}, column `{column}`: {message}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The row group.
        row_group: usize,
        /// The column.
        column: &'static str,
        /// What is wrong and what was expected.
        message: String,
    },
    /// No data where data was expected.
    #[error("{spec}: {message}")]
    Empty {
        /// The dataset path, directory or glob.
        spec: String,
        /// What was found.
        message: String,
    },
    /// A converter's input file is malformed.
    #[error("{path}: {message}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong, and where, and what was expected.
        message: String,
    },
    /// A caller passed an invalid argument.
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Input {
            path: path.into(),
            message: message.into(),
        }
    }
}
