//! Errors of the data layer. Each names the file, and the row group, column or line where known.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

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

/// Runs `decode`, a call into the Parquet decoder on `path`'s bytes, turning a panic of the
/// decoder into [`DataError::NotParquet`]: a corrupt file must not take the process down.
/// Parquet 57 panicked on several footers `fuzz/`'s `parquet` target made (apache/arrow-rs#9839,
/// a capacity overflow); 60 returns errors for those, and the guard stays for the next one.
pub(crate) fn guard_decoder<T>(path: &Path, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(DataError::NotParquet {
            path: path.to_path_buf(),
            message: format!("the Parquet decoder failed: {reason}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_of_the_decoder_is_an_error_naming_the_file() {
        let path = Path::new("corrupt.parquet");
        let err = guard_decoder::<()>(path, || {
            panic!("called `Option::unwrap()` on a `None` value")
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::NotParquet { .. }), "{err:?}");
        assert!(
            msg.contains("corrupt.parquet")
                && msg.contains("the Parquet decoder failed: called `Option::unwrap()`"),
            "{msg}"
        );
        assert_eq!(guard_decoder(path, || Ok(7)).unwrap(), 7);
    }
}
