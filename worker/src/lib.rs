//! The worker side of elbo: the training step over a flat gradient buffer, optimisers with
//! checkpointable state, checkpoint I/O, and the ring all-reduce (a [`Reduce`] over any
//! point-to-point [`ring::RingTransport`]), and the session with the coordinator.

pub mod checkpoint;
mod error;
mod flat;
pub mod grpc_ring;
mod optim;
pub mod ring;
pub mod session;
mod trainer;

pub use error::{Result, WorkerError};
pub use flat::{FlatLayout, Slot};
pub use optim::{
    clip_grad_norm, global_norm, Optimizer, OptimizerConfig, OptimizerKind, OptimizerState,
    Schedule,
};
pub use trainer::{LocalReduce, Reduce, StepConfig, StepReport, Timings, Trainer};
