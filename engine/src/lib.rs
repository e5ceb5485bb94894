//! The run engine: a run from its config to its end, in one process or many.
//!
//! - [`Engine`] holds what a program brings: the model registry (`model.kind` → a variant) and
//!   the cache of generated data. From a config it opens the data and builds the model.
//! - [`Job`] is what every process of a run derives from the config alone — data, plan, step
//!   count, a freshly seeded trainer — so a single process, each worker and the launcher agree
//!   by construction.
//! - One training loop (`steps.rs`) serves the single process (world 1) and every worker (its
//!   rank of world N); [`train`] runs it here or launches local workers, [`worker::run`] runs a
//!   worker's generations against a coordinator, [`launch::serve`] runs a coordinator.
//! - The run directory (`config.toml`, `metrics.jsonl`, checkpoints, pictures), evaluation and
//!   pictures, Prometheus metrics ([`telemetry`]), and the benchmarks.
//!
//! Everything returns typed errors ([`EngineError`]); the CLI only parses, wires and reports.

mod bench;
mod bench_ring;
mod build;
mod error;
mod eval;
mod generation;
mod job;
pub mod launch;
mod local;
mod pictures;
mod procs;
mod progress;
mod run_dir;
mod signal;
mod steps;
mod summary;
pub mod telemetry;
mod tls;
mod train;
pub mod worker;

pub use bench::{
    data_bench, BenchConfig, DataBench, DataBenchReport, TrainBench, TrainBenchReport, MODEL,
};
pub use bench_ring::{
    allreduce, rank, train_bench, AllreduceBench, AllreduceReport, RankBench, RankKind,
};
pub use build::{binarizer, device, model_spec, step_config, Engine};
pub use error::{EngineError, Result};
pub use eval::{evaluate, load_run, TrainedRun, MAX_IW_SAMPLES};
pub use job::Job;
pub use pictures::{write_samples, MAX_SAMPLES};
pub use run_dir::{changed_keys, config_sha256};
pub use signal::StopSignal;
pub use summary::{TrainOptions, TrainSummary};
pub use train::train;
