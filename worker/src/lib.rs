//! The worker side of elbo: the training step over a flat gradient buffer, optimisers with
//! checkpointable state, checkpoint I/O, the ring all-reduce (over any point-to-point
//! [`ring::RingTransport`]; over gRPC it is the trainer's [`Reduce`]), and the session with the
//! coordinator.

pub mod checkpoint;
mod error;
mod flat;
pub mod grpc_ring;
mod optim;
mod peer_server;
pub mod ring;
mod ring_wire;
pub mod session;
mod trainer;

pub use error::{Result, WorkerError};
pub use flat::{FlatLayout, Slot};
pub use optim::{
    clip_grad_norm, clip_scale, global_norm, Optimizer, OptimizerConfig, OptimizerState, Schedule,
};
pub use peer_server::{ring_credentials, ChunkDecoder, LeBytes};
pub use ring_wire::encode_chunk;
pub use trainer::{LocalReduce, Reduce, StepConfig, StepReport, Timings, Trainer};
