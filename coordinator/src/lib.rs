//! The elbo coordinator: a gRPC service that holds the rendezvous of a run's workers, assigns
//! ranks and forms the ring (a generation), commits steps once every rank has reported them,
//! compares replica checksums, receives checkpoints from rank 0, and watches heartbeats.
//!
//! Membership is elastic. A lost worker (closed session, missed heartbeats) or a newcomer halts
//! the running generation: every rank stops at a step boundary and says how far it got; the
//! furthest state defines the run (steps before it are committed), workers that lag or join get
//! that state from a live peer through the coordinator, and the next generation re-forms the
//! ring from whoever is there — while at least `min_workers` are. Because the data plan deals
//! each global batch across whatever world trains it, no row is lost or repeated. What it
//! commits and saves goes to a [`RunStore`]: the coordinator itself knows nothing of files.

mod auth;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod service;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use service::Coordinator;

/// Longest run token.
pub const MAX_TOKEN: usize = 1024;

/// Whether `token` can be a run token: printable ASCII without spaces, at most [`MAX_TOKEN`]
/// characters (empty: no token).
pub fn valid_token(token: &str) -> bool {
    token.len() <= MAX_TOKEN && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Files of a checkpoint by name.
pub type Files = BTreeMap<String, Vec<u8>>;

/// What a run needs of its coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Workers must present this run id.
    pub run_id: String,
    /// Workers must present this token to open a session (printable ASCII without spaces, at
    /// most [`MAX_TOKEN`] characters: it travels in a header).
    pub token: String,
    /// The run's config (TOML), sent to each worker.
    pub config_toml: String,
    /// Its SHA-256; a worker that brings its own config must match it.
    pub config_sha256: String,
    /// World size to wait for.
    pub workers: u32,
    /// Fewest workers to start with once the rendezvous times out.
    pub min_workers: u32,
    /// How long the rendezvous waits.
    pub rendezvous_timeout: Duration,
    /// Silence after which a worker counts as lost.
    pub heartbeat_timeout: Duration,
    /// How long a worker may take to halt at a step boundary or to send its state when asked.
    pub step_timeout: Duration,
    /// Replica checksum period in steps (0 = never).
    pub checksum_every: u64,
    /// Checkpoint period in steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Global steps committed before this run (from the checkpoint it resumes).
    pub start_step: u64,
    /// Train until this global step (exclusive).
    pub stop_step: u64,
    /// The checkpoint to resume from.
    pub checkpoint: Option<Files>,
    /// Largest message accepted (a checkpoint upload).
    pub max_message_bytes: usize,
    /// Serve over TLS only.
    pub tls: Option<elbo_proto::tls::Tls>,
}

/// Time of a step's parts: the slowest rank's, per part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Waiting for the batch.
    pub data: Duration,
    /// Forward and backward pass.
    pub compute: Duration,
    /// The all-reduce.
    pub reduce: Duration,
    /// Clipping and the optimiser.
    pub update: Duration,
}

/// A step every rank has reported.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedStep {
    /// Global step (0-based).
    pub step: u64,
    /// Data cursor after the step: epoch.
    pub epoch: u64,
    /// Data cursor after the step: step within the epoch.
    pub step_in_epoch: u64,
    /// Loss terms of the global batch.
    pub terms: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// False when the step was skipped as non-finite.
    pub applied: bool,
    /// Rows of the global batch.
    pub rows: u64,
    /// Ranks that took part.
    pub world: u32,
    /// The ring generation it was trained in.
    pub generation: u64,
    /// The slowest rank's time per part.
    pub timings: StepTimings,
    /// Test-set figures of the model after the step (rank 0's, on evaluation steps).
    pub test: BTreeMap<String, f64>,
}

/// Where a run's committed steps and checkpoints go (the run directory, in the CLI).
pub trait RunStore: Send + Sync + 'static {
    /// A step was committed (called in step order).
    fn committed(&self, step: &CommittedStep) -> Result<(), String>;
    /// Writes a checkpoint of `step` global steps; returns once it is durable.
    fn save_checkpoint(&self, step: u64, files: &Files) -> Result<(), String>;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Steps committed, in total.
    pub steps: u64,
    /// World size of the last generation.
    pub world: u32,
    /// The last generation.
    pub generation: u64,
    /// Global step of the newest checkpoint saved.
    pub checkpoint: Option<u64>,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Cannot listen or serve.
    #[error("coordinator: cannot serve on {addr}: {message}")]
    Serve {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// Invalid settings.
    #[error("coordinator: {0}")]
    Invalid(String),
    /// The run failed.
    #[error("the run failed: {0}")]
    Failed(String),
}

/// Stops a running coordinator from another thread (the launcher, when a child dies).
#[derive(Clone)]
pub struct Aborter(Arc<service::Shared>);

impl Aborter {
    /// Fails the run with `reason`: every worker is told to stop.
    pub fn abort(&self, reason: &str) {
        self.0.fail(reason.to_string());
    }

    /// Stops the run at the next step boundary with a checkpoint there (what SIGTERM asks): the
    /// step in flight is aborted, the furthest worker's state is written, every worker stops.
    pub fn drain(&self, reason: &str) {
        self.0.drain(reason);
    }
}
