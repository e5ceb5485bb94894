//! Errors of the worker.

use std::path::PathBuf;

/// Result alias of the worker.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// What can go wrong training or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] elbo_models::ModelError),
    /// The data layer failed.
    #[error(transparent)]
    Data(#[from] elbo_datasets::DataError),
    /// Too many non-finite steps in a row.
    #[error("{count} non-finite steps in a row, the last at step {step} (non-finite: {what}); stopping. Lower train.lr, set train.clip_norm, or check the data")]
    NonFinite {
        /// Consecutive skipped steps.
        count: u32,
        /// The global step.
        step: u64,
        /// Which terms or gradients were non-finite.
        what: String,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A collective could not complete: a peer was lost, sent something malformed or too late,
    /// or the coordinator aborted the step. The worker's state is that of the last completed
    /// step, and the run can go on in a new generation of the ring.
    #[error("ring: {0}")]
    Ring(String),
    /// The coordinator refused, broke off or could not be reached.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// An invalid setting.
    #[error("{0}")]
    Invalid(String),
    /// A broken invariant (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        WorkerError::Checkpoint {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
