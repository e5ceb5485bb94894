//! What `elbo train` is asked and what it reports, and the end of a finished run, shared by
//! the run in this process and the run with local workers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use candle_core::Device;
use elbo_models::{Metrics as Figures, Model};

use crate::error::Result;
use crate::eval::evaluate;
use crate::job::Job;
use crate::pictures::write_pictures;

/// How to run `elbo train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Device: `cpu` or `cuda:N`.
    pub device: String,
    /// Resume even if the config differs from the checkpoint's.
    pub force: bool,
    /// Stop after this many global steps (with a checkpoint).
    pub max_steps: Option<u64>,
    /// The `elbo` executable, started as `elbo worker` for local workers.
    pub exe: PathBuf,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_addr: Option<SocketAddr>,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps trained by this invocation.
    pub steps: u64,
    /// Wall-clock seconds it took.
    pub seconds: f64,
    /// Global batch rows per second.
    pub samples_per_s: f64,
    /// Workers of the last generation (1 in one process).
    pub world: u32,
    /// Generation of the last ring (distributed runs).
    pub generation: Option<u64>,
    /// The global step the run stands at.
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// The newest checkpoint's directory.
    pub checkpoint: PathBuf,
    /// The global step of the newest checkpoint.
    pub checkpoint_step: u64,
    /// A stop signal ended it early.
    pub interrupted: bool,
    /// Test figures of the finished model (when the run is complete).
    pub test: Option<Figures>,
}

/// The end of a finished run: its test figures (`evaluated` after its last step, or evaluated
/// here) and its pictures.
pub(crate) fn finish(
    job: &Job,
    model: &dyn Model,
    device: &Device,
    evaluated: Option<Figures>,
) -> Result<Figures> {
    let figures = match evaluated {
        Some(figures) => figures,
        None => evaluate(model, &job.test, &job.cfg, device, None)?,
    };
    write_pictures(
        model,
        &job.test,
        &job.cfg,
        Path::new(&job.cfg.run.dir),
        device,
    )?;
    Ok(figures)
}
