//! The run directory: the resolved config, metrics.jsonl, and resume checks.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use elbo_settings::Config;
use sha2::{Digest, Sha256};

use crate::error::{io, EngineError, Result};

/// SHA-256 (hex) of the resolved config as TOML, `run.dir` left out (a run may move).
pub fn config_sha256(cfg: &Config) -> String {
    let mut cfg = cfg.clone();
    cfg.run.dir.clear();
    Sha256::digest(cfg.to_toml().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn flat(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flat(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Keys whose values differ between two configs, as `key: old → new`. `run.dir` (a run may
/// move) and `cluster.*` (training is the same at any world size) are left out.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flat("", &toml::Value::Table(old.to_value()), &mut a);
    flat("", &toml::Value::Table(new.to_value()), &mut b);
    let compared = |k: &String| k != "run.dir" && !k.starts_with("cluster.");
    a.retain(|k, _| compared(k));
    b.retain(|k, _| compared(k));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} → {}",
                a.get(k).map_or("(absent)", String::as_str),
                b.get(k).map_or("(absent)", String::as_str)
            )
        })
        .collect()
}

/// Writes `config.toml` atomically.
pub fn write_config(run_dir: &Path, cfg: &Config) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(io(format!(
        "cannot create run directory {}",
        run_dir.display()
    )))?;
    let path = run_dir.join("config.toml");
    let cannot = || format!("cannot write {}", path.display());
    let mut tmp = tempfile::NamedTempFile::new_in(run_dir).map_err(io(cannot()))?;
    tmp.write_all(cfg.to_toml().as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io(cannot()))?;
    tmp.persist(&path).map_err(|e| io(cannot())(e.error))?;
    Ok(())
}

/// Refuses to resume with a different config unless forced; lists what changed.
pub fn check_resume_config(old: &Config, new: &Config, force: bool) -> Result<()> {
    let changed = changed_keys(old, new);
    if changed.is_empty() {
        return Ok(());
    }
    if force {
        tracing::warn!(changed = ?changed, "resuming with a changed config (--force)");
        return Ok(());
    }
    Err(EngineError::Invalid(format!(
        "the run directory holds a checkpoint of a run with another config; changed keys:\n  {}\nresume with the same config, pass --force to resume anyway, or use another run.dir",
        changed.join("\n  ")
    )))
}

/// `metrics.jsonl`: one JSON object per logged step.
pub struct Metrics {
    path: PathBuf,
    file: File,
}

impl Metrics {
    /// Opens the run's metrics for appending, first dropping lines past `keep_through_step` (a
    /// resumed run rewrites what it redoes, so the file matches an uninterrupted run's).
    pub fn open(run_dir: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: Vec<String> = match (File::open(&path), keep_through_step) {
            (Ok(f), Some(last)) => BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= last)
                })
                .collect(),
            _ => Vec::new(),
        };
        let cannot = || format!("cannot write {}", path.display());
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io(cannot()))?;
        for line in kept {
            writeln!(file, "{line}").map_err(io(cannot()))?;
        }
        Ok(Metrics { path, file })
    }

    /// Appends one record.
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(io(format!("cannot write {}", self.path.display())))
    }

    /// Every record of a run's metrics file, in file order (none if it cannot be read).
    pub fn records(run_dir: &Path) -> Vec<serde_json::Value> {
        let Ok(f) = File::open(run_dir.join("metrics.jsonl")) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .collect()
    }
}
