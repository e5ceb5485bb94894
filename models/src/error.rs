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
    /// Not a failure: the forward pass of a batch-norm moments round reached the layer in this
    /// slot, the one it measures, and stops there, since nothing after that layer is used.
    /// [`crate::Norms::measure`] runs that pass and takes this as its end; a model that lets
    /// it escape ran a moments round's pass outside `measure`.
    #[error(
        "batch-norm layer {0} was measured, and the forward pass of its moments round stops \
         there (a moments round's pass runs inside Norms::measure)"
    )]
    Measured(usize),
}
