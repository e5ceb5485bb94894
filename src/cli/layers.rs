//! Config flags shared by the subcommands that take a config, and the data cache location.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use elbo_settings::{Config, Layers};

/// `--config FILE` and repeated `--set KEY=VALUE`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// TOML config file (layered over the built-in defaults).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set train.batch_size=256` (repeatable; wins over file and env).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// Resolves defaults ← file ← `ELBO__*` environment ← `--set` flags.
    pub fn load(&self) -> anyhow::Result<Config> {
        let layers = Layers {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            flags: self.set.clone(),
        };
        elbo_settings::load(&layers).context("invalid configuration")
    }
}

/// Where generated data (the built-in sprites set) is cached: `$ELBO_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/elbo`, else `~/.cache/elbo`, else `.elbo-cache`.
pub fn cache_root() -> PathBuf {
    let non_empty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    non_empty("ELBO_CACHE_DIR")
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|p| p.join("elbo")))
        .or_else(|| non_empty("HOME").map(|p| p.join(".cache").join("elbo")))
        .unwrap_or_else(|| PathBuf::from(".elbo-cache"))
}
