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

/// `e` and its causes, outermost first.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// Whether a connection failed in its TLS handshake (a certificate not trusted or not for this
/// name, a server without TLS): waiting does not mend that. rustls reports these as
/// `InvalidData` I/O errors.
pub(crate) fn handshake_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        cause = c.source();
    }
    false
}
