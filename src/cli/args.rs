//! Flags shared by the subcommands: the config layers, where a run lives, the metrics endpoint; the
//! data cache location from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use elbo_engine::Engine;
use elbo_settings::{Config, Layers, TlsConfig};

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
    pub fn load(&self, engine: &Engine) -> elbo_engine::Result<Config> {
        engine.load_config(&Layers {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            flags: self.set.clone(),
        })
    }
}

/// TLS files of a process that needs them before it has the run's config (`elbo worker`, the
/// ring benchmarks): the same settings as `[cluster.tls]`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// This end's certificate chain (PEM; cert-manager's tls.crt). With --tls-key and
    /// --tls-ca: TLS on every connection.
    #[arg(long, env = "ELBO_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// Its private key (PEM; tls.key).
    #[arg(long, env = "ELBO_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// The CA that signs the run's certificates (PEM; ca.crt).
    #[arg(long, env = "ELBO_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<String>,
    /// Demand client certificates on this process's servers (mutual TLS).
    #[arg(long, env = "ELBO_TLS_MUTUAL")]
    pub tls_mutual: bool,
    /// Check servers' certificates against this name (default: the host dialled).
    #[arg(long, env = "ELBO_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The flags as `[cluster.tls]` settings.
    pub fn settings(&self) -> TlsConfig {
        TlsConfig {
            cert: self.tls_cert.clone().unwrap_or_default(),
            key: self.tls_key.clone().unwrap_or_default(),
            ca: self.tls_ca.clone().unwrap_or_default(),
            mutual: self.tls_mutual,
            server_name: self.tls_server_name.clone().unwrap_or_default(),
        }
    }
}

/// `--metrics-addr ADDR` (`elbo train`, `elbo coordinator`, `elbo worker`).
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Where a run lives and how far it goes (`elbo train` and `elbo coordinator`).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Run directory (overrides run.dir); a directory holding a checkpoint is resumed.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Resume even if the config differs from the one the checkpoint was written with.
    #[arg(long)]
    pub force: bool,
    /// Stop after this many global steps (with a checkpoint); the run resumes from there.
    #[arg(long)]
    pub max_steps: Option<u64>,
}

impl RunArgs {
    /// The config with `--run-dir` applied.
    pub fn apply(&self, mut cfg: Config) -> Config {
        if let Some(dir) = &self.run_dir {
            cfg.run.dir = dir.to_string_lossy().into_owned();
        }
        cfg
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
