//! `elbo train`: the run a config describes, in this process ([`crate::local`]) or — with
//! `cluster.workers > 1` — as a coordinator here and the workers as child processes
//! ([`crate::launch`]). Either way the run directory is resumed when it holds a checkpoint, and
//! a finished run is evaluated and drawn.

use elbo_settings::Config;

use crate::build::{device, Engine};
use crate::error::Result;
use crate::job::Job;
use crate::signal::StopSignal;
use crate::summary::{TrainOptions, TrainSummary};

/// `elbo train`: trains the run `cfg` describes, resuming its directory's newest checkpoint.
pub fn train(
    engine: &Engine,
    cfg: Config,
    options: &TrainOptions,
    stop: &StopSignal,
) -> Result<TrainSummary> {
    let device = device(&options.device)?;
    let job = Job::prepare(engine, cfg)?;
    if job.cfg.cluster.workers > 1 {
        crate::launch::train(&job, options, &device, stop)
    } else {
        crate::local::train(&job, options, &device, stop)
    }
}
