//! Errors of the run engine, by whose fault they are: the configuration, the data, the model,
//! training (the worker crate's errors: a lost coordinator, a broken ring, non-finite steps,
//! checkpoints), the coordinator, the file system, a request that cannot work, or a run that
//! failed.

use elbo_coordinator::CoordinatorError;
use elbo_datasets::DataError;
use elbo_models::ModelError;
use elbo_settings::SettingsError;
use elbo_worker::WorkerError;

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What can go wrong running a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is invalid (names the key and where it came from).
    #[error("invalid configuration: {0}")]
    Settings(SettingsError),
    /// Data could not be opened or read.
    #[error("{what}: {error}")]
    Data {
        /// What was being read (`data.train = "…"`).
        what: String,
        /// Why it failed.
        error: DataError,
    },
    /// The model cannot be built or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Training failed; [`WorkerError::Coordinator`] and [`WorkerError::Ring`] are the faults a
    /// worker survives (it reconnects, or goes on in a new generation).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The coordinator cannot serve, or the run it coordinates failed.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// A file or process could not be used.
    #[error("{what}: {error}")]
    Io {
        /// What was being done (`cannot write runs/x/metrics.jsonl`).
        what: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// A request that cannot work: a bad argument, data that does not fit the model, a run
    /// directory that is not one.
    #[error("{0}")]
    Invalid(String),
    /// The run failed for a reason found while it ran.
    #[error("{0}")]
    Failed(String),
}

impl From<SettingsError> for EngineError {
    fn from(e: SettingsError) -> Self {
        EngineError::Settings(e)
    }
}

impl From<DataError> for EngineError {
    fn from(e: DataError) -> Self {
        EngineError::Data {
            what: "data".into(),
            error: e,
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(ModelError::Candle(e))
    }
}

/// `map_err` for I/O: `what` names the file or the action.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |error| EngineError::Io { what, error }
}

/// `map_err` for data: `what` names the data.
pub(crate) fn data(what: impl Into<String>) -> impl FnOnce(DataError) -> EngineError {
    let what = what.into();
    move |error| EngineError::Data { what, error }
}
