//! Subcommands of `elbo`: each parses its flags, calls the engine (or a library) and reports.

/// Returns a [`BadInput`] error: the command line cannot work as given.
macro_rules! bad {
    ($($arg:tt)*) => {
        return Err(crate::cli::BadInput(format!($($arg)*)).into())
    };
}

mod args;
mod bench;
mod config_cmd;
mod data;
mod eval;
mod train;

use clap::{Parser, Subcommand};
use elbo_engine::{Engine, EngineError};
use elbo_models::{ModelError, Registry};
use elbo_worker::WorkerError;

/// Distributed data-parallel training of variational autoencoders.
#[derive(Debug, Parser)]
#[command(name = "elbo", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (resumes a run directory that holds a checkpoint).
    Train(train::TrainArgs),
    /// Coordinate a distributed run: workers join it, it writes the run directory.
    Coordinator(train::CoordinatorArgs),
    /// Join a coordinator's run as a worker.
    Worker(train::WorkerArgs),
    /// Evaluate a trained run on test data: the figures its model reports (−ELBO and its
    /// terms, the IW bound, active units for the VAE).
    Eval(eval::EvalArgs),
    /// Draw samples from a trained run's model into a PNG grid.
    Sample(eval::SampleArgs),
    /// Inspect the resolved configuration and the model kinds.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Convert, generate and inspect datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs one parsed command line with the built-in model variants.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let engine = Engine::new(Registry::builtin(), args::cache_root());
    match cli.command {
        Command::Train(a) => train::train(&engine, a),
        Command::Coordinator(a) => train::coordinator(&engine, a),
        Command::Worker(a) => train::worker(&engine, a),
        Command::Eval(a) => eval::eval(&engine, a),
        Command::Sample(a) => eval::sample(&engine, a),
        Command::Config(cmd) => config_cmd::run(&engine, cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Bench(cmd) => bench::run(&engine, cmd),
    }
}

/// A command line that cannot work as given (a flag out of range, flags that exclude each
/// other): exits 2 like clap's own usage errors.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// A run stopped by a signal (SIGTERM, Ctrl-C) before its end, with a checkpoint: exits 143.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted before the end of the run (the same command resumes it)")
    }
}

impl std::error::Error for Interrupted {}

/// elbo's exit codes, for schedulers (a Kubernetes `podFailurePolicy` fails the job on 2 rather
/// than retrying it):
///
/// - 0: done;
/// - 143 (128 + SIGTERM): stopped by SIGTERM or Ctrl-C at a step boundary with a checkpoint,
///   before the run's end: the same command resumes (a Job must not count the pod as done);
/// - 2: the command line, the config, a model it describes or a request cannot work as given —
///   running it again changes nothing (clap's usage errors exit 2 as well);
/// - 1: anything else: the run failed while it ran (a lost coordinator, I/O, non-finite
///   steps), and a retry may succeed.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.is::<Interrupted>() {
        return 143;
    }
    let permanent = err.chain().any(|e| {
        e.is::<BadInput>()
            || matches!(
                e.downcast_ref::<EngineError>(),
                Some(
                    EngineError::Settings(_)
                        | EngineError::Invalid(_)
                        | EngineError::Worker(WorkerError::Invalid(_))
                        | EngineError::Model(ModelError::Spec(_))
                )
            )
    });
    if permanent {
        2
    } else {
        1
    }
}
