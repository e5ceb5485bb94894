//! Subcommands of `elbo`: each parses its flags, calls the engine (or a library) and reports.

mod args;
mod bench;
mod config_cmd;
mod data;
mod eval;
mod train;

use clap::{Parser, Subcommand};
use elbo_engine::Engine;
use elbo_models::Registry;

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
