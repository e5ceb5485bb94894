//! Helpers shared by the end-to-end tests: run the `elbo` binary with a private cache.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `elbo ARGS` with `cache` as its cache directory and warnings-only logs.
pub fn elbo(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_LOG", "warn")
        .output()
        .expect("the elbo binary runs")
}

/// Its stdout, after asserting it succeeded (its stderr in the failure message).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
