//! Subcommands of `elbo`.

mod bench;
mod config_cmd;
mod data;
mod layers;

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
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
