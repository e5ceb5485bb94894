//! Subcommands of `elbo`.

mod bench;
mod bench_ring;
mod build;
mod config_cmd;
mod data;
mod eval;
mod job;
mod launch;
mod layers;
mod pictures;
mod procs;
mod progress;
mod run_dir;
mod train;
mod worker;

use clap::{Parser, Subcommand};

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
    Coordinator(launch::CoordinatorArgs),
    /// Join a coordinator's run as a worker.
    Worker(worker::WorkerArgs),
    /// Evaluate a trained run on test data: −ELBO, its terms, the IWAE bound, active units.
    Eval(eval::EvalArgs),
    /// Draw samples from a trained run's prior into a PNG grid.
    Sample(eval::SampleArgs),
    /// Inspect the resolved configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Convert, generate and inspect datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Coordinator(args) => launch::serve(args),
        Command::Worker(args) => worker::run(args),
        Command::Eval(args) => eval::eval(args),
        Command::Sample(args) => eval::sample(args),
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
