//! Errors of the model layer.

/// Result alias of the model layer.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model specification cannot be built.
    #[error("invalid model: {0}")]
    Spec(String),
    /// The input does not fit the model.
    #[error("invalid input: {0}")]
    Input(String),
}
