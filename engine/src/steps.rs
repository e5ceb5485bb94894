//! The training loop every run uses: one process (world 1, the identity reduction) and each
//! worker of a distributed run (its rank of world N, the ring all-reduce). It streams the
//! rank's share of every global batch from the data cursor on, trains it, and moves the
//! cursor; what happens around each step — progress and checkpoints in one process, commands,
//! reports and uploads in a worker — is its [`Driver`]'s.

use std::time::{Duration, Instant};

use candle_core::Device;
use elbo_datasets::{Batch, BatchStream, Cursor};
use elbo_worker::{Reduce, StepReport, Trainer};

use crate::build::binarizer;
use crate::error::{data, Result};
use crate::job::Job;

/// Threads decoding Parquet chunks ahead of the training thread.
const DECODE_THREADS: usize = 1;

/// What happens around each step of a loop.
pub(crate) trait Driver {
    /// Why the loop stopped early.
    type Stop;

    /// The batch of global step `step` is ready (after waiting `data` for it): `Some` stops
    /// before training it.
    fn before(&mut self, step: u64, batch: &Batch, data: Duration) -> Result<Option<Self::Stop>>;

    /// A step was trained and the cursor moved past it: `Some` stops after it.
    fn after(
        &mut self,
        trainer: &Trainer,
        report: &StepReport,
        batch: &Batch,
        cursor: Cursor,
        data: Duration,
    ) -> Result<Option<Self::Stop>>;
}

/// How a loop ended.
pub(crate) enum Ended<S> {
    /// The stop step (or the end of the last epoch) was reached.
    Done,
    /// The driver stopped it.
    Stopped(S),
}

/// Which share of each global batch a loop trains, and until which global step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Share {
    /// Ranks training each global batch.
    pub world: u32,
    /// This loop's rank.
    pub rank: u32,
    /// Train until this global step (exclusive).
    pub stop_at: u64,
}

/// Trains from `cursor` until `share.stop_at` or the end of the run, moving `cursor` past
/// every step taken. A failed collective is an error (`WorkerError::Ring`); the trainer and
/// the cursor then stand after the last completed step.
pub(crate) fn train<D: Driver>(
    job: &Job,
    trainer: &mut Trainer,
    cursor: &mut Cursor,
    share: Share,
    reduce: &mut dyn Reduce,
    device: &Device,
    driver: &mut D,
) -> Result<Ended<D::Stop>> {
    let cfg = &job.cfg;
    while cursor.epoch < cfg.train.epochs && trainer.step() < share.stop_at {
        let plan = job
            .plan
            .rank_plan(*cursor, share.world, share.rank)
            .map_err(data("cannot plan data.train"))?;
        let mut stream = BatchStream::new(job.train.clone(), plan, binarizer(cfg), DECODE_THREADS);
        loop {
            let waited = Instant::now();
            let Some(batch) = stream.next() else { break };
            let batch = batch.map_err(data("cannot read data.train"))?;
            let waited = waited.elapsed();
            if let Some(stop) = driver.before(trainer.step(), &batch, waited)? {
                return Ok(Ended::Stopped(stop));
            }
            let report = trainer.train_step(&batch, reduce, device)?;
            *cursor = job.normalise(batch.cursor_after);
            if let Some(stop) = driver.after(trainer, &report, &batch, *cursor, waited)? {
                return Ok(Ended::Stopped(stop));
            }
            if trainer.step() >= share.stop_at {
                break;
            }
        }
        *cursor = job.normalise(*cursor);
    }
    Ok(Ended::Done)
}
