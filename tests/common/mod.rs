//! Helpers shared by the end-to-end tests: run the `elbo` binary with a private cache, keep
//! track of the processes a test starts (and kill them, with their children, however the test
//! ends), and read checkpoints and metrics back.
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

pub mod netns;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A small run: 600 sprites of 32×32, batch 48 (13 steps per epoch, the last one short), MLP.
pub const SMALL: [&str; 16] = [
    "--set",
    "data.sprites.n=600",
    "--set",
    "data.sprites.size=32",
    "--set",
    "train.batch_size=48",
    "--set",
    "train.epochs=2",
    "--set",
    "model.hidden=64",
    "--set",
    "train.log_every=1",
    "--set",
    "cluster.checksum_every=3",
    "--set",
    "train.checkpoint_every=10",
];

/// A small two-layer ladder VAE.
pub const LADDER: [&str; 8] = [
    "--set",
    "model.kind=ladder",
    "--set",
    "model.latent_dim=4",
    "--set",
    "model.ladder.latent_dims=[8]",
    "--set",
    "model.ladder.hidden=[64, 32]",
];

/// Runs `elbo ARGS` with `cache` as its cache directory and warnings-only logs.
pub fn elbo(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_LOG", "warn")
        .output()
        .expect("the elbo binary runs")
}

/// `elbo coordinator` of the small run in `run` on `listen`, with the test token and `extra`
/// arguments; stdout and stderr piped.
pub fn coordinator_cmd(listen: &str, run: &Path, cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elbo"));
    cmd.args(["coordinator", "--listen", listen, "--run-dir"])
        .arg(run)
        .args(SMALL)
        .args(extra)
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_TOKEN", "s3cret")
        .env("ELBO_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `elbo worker` `id` joining the coordinator at `url` with the test token, one compute
/// thread; `cmd` starts the binary (the binary itself, or a wrapper such as `ip netns exec`).
pub fn worker_cmd(mut cmd: Command, url: &str, id: &str, cache: &Path) -> Command {
    cmd.args(["worker", "--coordinator", url, "--worker-id", id])
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_TOKEN", "s3cret")
        .env("ELBO_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
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

/// Processes, each in a process group of its own; dropping this kills every group (so the
/// children of a launcher die with it) and reaps the processes.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Procs {
    /// Starts `cmd` in a new process group; returns its index.
    pub fn spawn(&mut self, cmd: &mut Command) -> usize {
        self.0
            .push(cmd.process_group(0).spawn().expect("elbo starts"));
        self.0.len() - 1
    }

    /// Waits (at most `limit`) for process `i`; returns whether it succeeded, and its stderr.
    pub fn wait(&mut self, i: usize, limit: Duration) -> (bool, String) {
        let (status, err) = self.status(i, limit);
        (status.success(), err)
    }

    /// Waits (at most `limit`) for process `i`; returns its exit status and its stderr.
    pub fn status(&mut self, i: usize, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let child = &mut self.0[i];
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap();
                }
                return (status, err);
            }
            assert!(
                Instant::now() < deadline,
                "process {i} did not finish in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. "KILL", "TERM", "STOP") to process `pid`.
    pub fn signal(pid: u32, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The parameters of a checkpoint, by tensor name.
pub fn params(checkpoint: &Path) -> BTreeMap<String, Vec<f32>> {
    elbo_worker::checkpoint::model_tensors(checkpoint).unwrap()
}

/// Relative L2 distance between two checkpoints' parameters.
pub fn distance(a: &Path, b: &Path) -> f64 {
    let (a, b) = (params(a), params(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, x) in &a {
        for (u, v) in x.iter().zip(&b[name]) {
            diff += f64::from(u - v).powi(2);
            norm += f64::from(*u).powi(2);
        }
    }
    (diff / norm).sqrt()
}

/// The records of a run's metrics.jsonl; a last line still being written (no newline yet) is
/// left out, so a running run can be read.
pub fn records(run: &Path) -> Vec<serde_json::Value> {
    all_records(run)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect()
}

/// The test-figure records of a run's metrics (`test_*` keys), in file order.
pub fn test_records(run: &Path) -> Vec<serde_json::Value> {
    all_records(run)
        .into_iter()
        .filter(|v| v.get("test_neg_elbo").is_some())
        .collect()
}

fn all_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(step, neg_elbo)` of a run's metrics.
pub fn curve(run: &Path) -> Vec<(u64, f64)> {
    records(run)
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["neg_elbo"].as_f64().unwrap()))
        .collect()
}

/// Pids of the live children of `parent` (from /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let fields: Vec<String> = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .map(String::from)
                        .collect();
                    // state, ppid
                    Some(fields.first()? != "Z" && fields.get(1)?.parse::<u32>().ok()? == parent)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The live child of `parent` whose command line has the argument `arg`.
pub fn child_with_arg(parent: u32, arg: &str) -> Option<u32> {
    children_of(parent).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
    })
}

/// Waits (at most `limit`) until `ready` holds.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
