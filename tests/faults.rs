//! Fault tolerance with real processes: workers killed, replaced, frozen, cut off the network;
//! the coordinator killed and restarted; the launcher stopped with SIGTERM; checkpoints
//! corrupted. Every run must finish without losing or repeating a row and without hanging:
//! each wait here has a deadline, and every process (with its children) is killed when the
//! test ends, pass or fail.

mod common;

use common::netns::Netns;
use common::{
    child_with_arg, coordinator_cmd, distance, elbo, ok, records, wait_until, worker_cmd, Procs,
    SMALL,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ELBO: &str = env!("CARGO_BIN_EXE_elbo");

/// The small run of the distributed tests over 4 epochs (52 steps), with a 1 s heartbeat timeout.
const RUN: [&str; 6] = [
    "--set",
    "train.epochs=4",
    "--set",
    "cluster.heartbeat_timeout_s=1",
    "--set",
    "cluster.step_timeout_s=20",
];
const STEPS: u64 = 52;
/// Slows each step down enough to interrupt a run at a chosen step.
const THROTTLE_MS: &str = "15";
/// No run here takes longer than this.
const LIMIT: Duration = Duration::from_secs(120);

/// `elbo train` with the test run, `extra` settings, throttled, in its own process group.
fn launcher(run: &Path, cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ELBO);
    cmd.args(["train", "--run-dir"])
        .arg(run)
        .args(SMALL)
        .args(RUN)
        .args(extra)
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_LOG", "warn")
        .env("ELBO_WORKER_THROTTLE_MS", THROTTLE_MS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for process `i` to succeed; returns its stdout.
fn finished(procs: &mut Procs, i: usize) -> String {
    let mut out = String::new();
    let mut stdout = procs.0[i].stdout.take().unwrap();
    let (ok, err) = procs.wait(i, LIMIT);
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    assert!(ok, "the run failed: {err}\n{out}");
    out
}

/// Steps committed so far (step records of metrics.jsonl; `train.log_every` is 1).
fn committed(run: &Path) -> usize {
    records(run).len()
}

/// The newest checkpoint directory of a run.
fn newest(run: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .collect();
    dirs.sort();
    dirs.pop().expect("a checkpoint")
}

fn final_loss(run: &Path) -> f64 {
    let recs = records(run);
    let last = recs.last().expect("metrics");
    assert_eq!(
        last["step"].as_u64(),
        Some(STEPS),
        "the run reached its end"
    );
    last["neg_elbo"].as_f64().unwrap()
}

/// Audit lines `generation step row` of every worker: for each step the rows of the
/// generation that completed it (the newest one that trained it), as row → uses.
fn rows_used(audits: &Path) -> (BTreeMap<u64, u32>, usize) {
    let mut by_step: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
    for entry in std::fs::read_dir(audits).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path())
            .unwrap()
            .lines()
        {
            let f: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            let (generation, step, row) = (f[0], f[1], f[2]);
            let slot = by_step.entry(step).or_insert((generation, Vec::new()));
            if generation > slot.0 {
                *slot = (generation, Vec::new());
            }
            if generation == slot.0 {
                slot.1.push(row);
            }
        }
    }
    let mut uses = BTreeMap::new();
    for (_, rows) in by_step.values() {
        for row in rows {
            *uses.entry(*row).or_insert(0) += 1;
        }
    }
    (uses, by_step.len())
}

/// A deterministic "random" step in [5, 35) for seed `seed`.
fn kill_step(seed: u64) -> usize {
    (5 + seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 30) as usize
}

#[test]
fn a_worker_killed_at_a_random_step_loses_and_repeats_no_row() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let whole = tmp.path().join("whole");
    ok(elbo(
        &[
            &["train", "--run-dir", whole.to_str().unwrap()][..],
            &SMALL,
            &RUN,
            &["--set", "cluster.workers=3"],
        ]
        .concat(),
        &cache,
    ));
    for seed in 1..=3 {
        let run = tmp.path().join(format!("run-{seed}"));
        let audits = tmp.path().join(format!("audit-{seed}"));
        std::fs::create_dir_all(&audits).unwrap();
        let mut procs = Procs::default();
        let mut cmd = launcher(
            &run,
            &cache,
            &[
                "--set",
                "cluster.workers=3",
                "--set",
                "cluster.restart_workers=false",
            ],
        );
        cmd.env("ELBO_AUDIT_ROWS", &audits);
        let l = procs.spawn(&mut cmd);
        let pid = procs.0[l].id();
        let at = kill_step(seed);
        wait_until(LIMIT, "the run reaches the kill step", || {
            committed(&run) >= at
        });
        let victim = child_with_arg(pid, "worker-1").expect("worker-1 runs");
        Procs::signal(victim, "KILL");
        let out = finished(&mut procs, l);
        assert!(out.contains("on 2 workers"), "seed {seed}: {out}");
        let (uses, steps) = rows_used(&audits);
        assert_eq!(steps as u64, STEPS, "seed {seed}: every step was trained");
        assert_eq!(uses.len(), 600, "seed {seed}: every row is used");
        assert!(
            uses.values().all(|&n| n == 4),
            "seed {seed}: each row exactly once per epoch"
        );
        let (a, b) = (final_loss(&whole), final_loss(&run));
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "seed {seed}: final −ELBO {b} vs {a} uninterrupted"
        );
        let d = distance(&newest(&whole), &newest(&run));
        assert!(d < 1e-3, "seed {seed}: parameters {d} apart (relative L2)");
    }
}

#[test]
fn a_killed_worker_is_replaced_and_the_world_grows_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let mut procs = Procs::default();
    let l = procs.spawn(&mut launcher(&run, &cache, &["--set", "cluster.workers=3"]));
    let pid = procs.0[l].id();
    wait_until(LIMIT, "the run reaches step 8", || committed(&run) >= 8);
    let victim = child_with_arg(pid, "worker-1").expect("worker-1 runs");
    let killed = Instant::now();
    Procs::signal(victim, "KILL");
    wait_until(LIMIT, "a replacement starts", || {
        child_with_arg(pid, "worker-1-r1").is_some()
    });
    let out = finished(&mut procs, l);
    // Replicas are compared every 3 steps: the run would have failed had the newcomer's
    // parameters differed from its peers'.
    assert!(out.contains("on 3 workers"), "{out}");
    let recs = records(&run);
    let last = recs.last().unwrap();
    assert_eq!(last["step"].as_u64(), Some(STEPS));
    assert_eq!(last["world"].as_u64(), Some(3), "the world grew back to 3");
    assert!(killed.elapsed() < LIMIT);
}

#[test]
fn a_frozen_worker_is_dropped_and_the_run_goes_on() {
    // A hung worker: SIGSTOP silences all its connections at once while they stay open.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let mut procs = Procs::default();
    let l = procs.spawn(&mut launcher(
        &run,
        &cache,
        &[
            "--set",
            "cluster.workers=3",
            "--set",
            "cluster.min_workers=2",
            "--set",
            "cluster.restart_workers=false",
        ],
    ));
    let pid = procs.0[l].id();
    wait_until(LIMIT, "the run reaches step 8", || committed(&run) >= 8);
    let frozen = child_with_arg(pid, "worker-2").expect("worker-2 runs");
    Procs::signal(frozen, "STOP");
    let stopped = Instant::now();
    let at = committed(&run);
    wait_until(Duration::from_secs(30), "training goes on", || {
        committed(&run) > at + 3
    });
    let recovered = stopped.elapsed();
    assert!(
        recovered < Duration::from_secs(10),
        "a 1 s heartbeat timeout, recovered after {recovered:?}"
    );
    Procs::signal(frozen, "KILL");
    let out = finished(&mut procs, l);
    assert!(out.contains("on 2 workers"), "{out}");
    assert_eq!(records(&run).last().unwrap()["step"].as_u64(), Some(STEPS));
}

/// A port free on `ip` right now.
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `elbo coordinator` of the test run on `listen`, with `extra` settings.
fn coordinator(listen: &str, run: &Path, cache: &Path, extra: &[&str]) -> Command {
    coordinator_cmd(listen, run, cache, &[&RUN[..], extra].concat())
}

/// A throttled worker of the test run; `cmd` starts the binary (see [`worker_cmd`]).
fn worker(cmd: Command, url: &str, id: &str, cache: &Path) -> Command {
    let mut cmd = worker_cmd(cmd, url, id, cache);
    cmd.args(["--run-id", "default"])
        .env("ELBO_WORKER_THROTTLE_MS", THROTTLE_MS);
    cmd
}

/// The world size of each committed step so far.
fn worlds(run: &Path) -> Vec<u64> {
    records(run)
        .iter()
        .map(|r| r["world"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_worker_cut_off_the_network_is_dropped_and_rejoins_when_mended() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            assert!(
                std::env::var_os("ELBO_REQUIRE_NETNS").is_none(),
                "ELBO_REQUIRE_NETNS is set, but no network namespace: {why}"
            );
            eprintln!("SKIPPED: no network namespace here ({why})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let audits = tmp.path().join("audit");
    std::fs::create_dir_all(&audits).unwrap();
    // Long enough (390 steps) for the cut worker to come back before the end.
    let epochs = 30;
    let listen = format!("{}:{}", ns.host_ip, free_port(ns.host_ip));
    let url = format!("http://{listen}");
    let mut procs = Procs::default();
    let c = procs.spawn(&mut coordinator(
        &listen,
        &run,
        &cache,
        &[
            "--set",
            &format!("train.epochs={epochs}"),
            "--set",
            "cluster.workers=3",
            "--set",
            "cluster.min_workers=2",
        ],
    ));
    let mut workers = Vec::new();
    for (id, start, ip) in [
        ("w0", Command::new(ELBO), ns.host_ip),
        ("w1", Command::new(ELBO), ns.host_ip),
        ("w2", ns.command(ELBO), ns.inside_ip),
    ] {
        let mut cmd = worker(start, &url, id, &cache);
        cmd.args(["--listen", &format!("{ip}:0"), "--audit-rows"])
            .arg(&audits);
        workers.push(procs.spawn(&mut cmd));
    }
    wait_until(LIMIT, "the run reaches step 8", || committed(&run) >= 8);
    ns.cut();
    let cut = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "3 steps without the cut-off worker",
        || worlds(&run).iter().filter(|&&w| w == 2).count() >= 3,
    );
    let recovered = cut.elapsed();
    assert!(
        recovered < Duration::from_secs(10),
        "a 1 s heartbeat timeout, recovered after {recovered:?}"
    );
    ns.mend();
    let out = finished(&mut procs, c);
    assert!(out.contains("checkpoint at step 390"), "{out}");
    for w in workers {
        let (ok, err) = procs.wait(w, Duration::from_secs(30));
        assert!(ok, "a worker failed: {err}");
    }
    let mut seen = worlds(&run);
    seen.dedup();
    assert_eq!(
        seen,
        [3, 2, 3],
        "the world shrank, then grew back when mended"
    );
    let (uses, steps) = rows_used(&audits);
    assert_eq!(steps, 13 * epochs, "every step was trained");
    assert_eq!(uses.len(), 600, "every row is used");
    assert!(
        uses.values().all(|&n| n == epochs as u32),
        "each row exactly once per epoch"
    );
}

#[test]
fn a_restarted_coordinator_finishes_the_run_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let listen = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let url = format!("http://{listen}");
    let world = ["--set", "cluster.workers=2"];
    let mut procs = Procs::default();
    let first = procs.spawn(&mut coordinator(&listen, &run, &cache, &world));
    let workers: Vec<usize> = (0..2)
        .map(|i| {
            procs.spawn(&mut worker(
                Command::new(ELBO),
                &url,
                &format!("w{i}"),
                &cache,
            ))
        })
        .collect();
    wait_until(LIMIT, "a checkpoint at step 20", || {
        run.join("checkpoints/step-000000020").is_dir()
    });
    Procs::signal(procs.0[first].id(), "KILL");
    let _ = procs.wait(first, Duration::from_secs(10));
    let second = procs.spawn(&mut coordinator(&listen, &run, &cache, &world));
    let out = finished(&mut procs, second);
    assert!(out.contains("checkpoint at step 52"), "{out}");
    for w in workers {
        let (ok, err) = procs.wait(w, Duration::from_secs(30));
        assert!(ok, "a worker failed: {err}");
    }
    let steps: Vec<u64> = records(&run)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "every step logged once"
    );
}

#[test]
fn sigterm_checkpoints_and_the_rerun_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let world = ["--set", "cluster.workers=2"];
    let whole = tmp.path().join("whole");
    ok(elbo(
        &[
            &["train", "--run-dir", whole.to_str().unwrap()][..],
            &SMALL,
            &RUN,
            &world,
        ]
        .concat(),
        &cache,
    ));
    let run = tmp.path().join("run");
    let mut procs = Procs::default();
    let l = procs.spawn(&mut launcher(&run, &cache, &world));
    let pid = procs.0[l].id();
    wait_until(LIMIT, "the run reaches step 23", || committed(&run) >= 23);
    let workers = common::children_of(pid);
    assert_eq!(workers.len(), 2);
    Procs::signal(pid, "TERM");
    let mut stdout = procs.0[l].stdout.take().unwrap();
    let (status, err) = procs.status(l, LIMIT);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    // 128 + SIGTERM: stopped with a checkpoint, not finished (a Kubernetes Job must not count
    // the pod as done).
    assert_eq!(status.code(), Some(143), "{err}\n{out}");
    assert!(out.contains("the same command resumes"), "{out}");
    for w in workers {
        assert!(
            !Path::new(&format!("/proc/{w}")).exists()
                || std::fs::read_to_string(format!("/proc/{w}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "worker {w} outlived the launcher"
        );
    }
    let stopped_at = newest(&run);
    assert!(
        stopped_at.ends_with(format!("step-{:09}", committed(&run))),
        "{} holds the last committed step",
        stopped_at.display()
    );
    ok(elbo(
        &[
            &["train", "--run-dir", run.to_str().unwrap()][..],
            &SMALL,
            &RUN,
            &world,
        ]
        .concat(),
        &cache,
    ));
    let (a, b) = (newest(&whole), newest(&run));
    for file in ["model.safetensors", "optim.safetensors", "state.json"] {
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
            "{file} differs from the uninterrupted run's"
        );
    }
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let train = |run: &Path, extra: &[&str]| {
        elbo(
            &[
                &["train", "--run-dir", run.to_str().unwrap()][..],
                &SMALL,
                &RUN,
                extra,
            ]
            .concat(),
            &cache,
        )
    };
    type Corruption = (&'static str, fn(&Path));
    let corruptions: [Corruption; 3] = [
        ("truncated", |d| {
            let f = d.join("model.safetensors");
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("flipped", |d| {
            let f = d.join("optim.safetensors");
            let mut bytes = std::fs::read(&f).unwrap();
            let i = bytes.len() - 7;
            bytes[i] ^= 0x10;
            std::fs::write(&f, bytes).unwrap();
        }),
        ("without a manifest", |d| {
            std::fs::remove_file(d.join("manifest.json")).unwrap();
        }),
    ];
    for (what, corrupt) in corruptions {
        let run = tmp.path().join(what.replace(' ', "-"));
        ok(train(&run, &["--max-steps", "20"]));
        corrupt(&run.join("checkpoints/step-000000020"));
        let out = train(&run, &[]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = ok(out);
        assert!(
            err.contains("the newest checkpoint is corrupt") && err.contains("step-000000020"),
            "{what}: {err}"
        );
        assert!(
            stdout.contains(&format!("trained {} steps", STEPS - 10)),
            "{what}: resumed from step 10: {stdout}"
        );
    }
    // Nothing intact at all is an error, never a silent restart from scratch.
    let run = tmp.path().join("truncated");
    for dir in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        std::fs::remove_file(dir.unwrap().path().join("manifest.json")).unwrap();
    }
    let out = train(&run, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no intact checkpoint"), "{err}");
}

#[test]
fn a_launcher_killed_outright_takes_its_workers_along() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let mut procs = Procs::default();
    let l = procs.spawn(&mut launcher(&run, &cache, &["--set", "cluster.workers=2"]));
    let pid = procs.0[l].id();
    wait_until(LIMIT, "the run reaches step 3", || committed(&run) >= 3);
    let workers = common::children_of(pid);
    assert_eq!(workers.len(), 2);
    Procs::signal(pid, "KILL");
    wait_until(Duration::from_secs(10), "every worker exits", || {
        workers.iter().all(|w| {
            !Path::new(&format!("/proc/{w}/cmdline")).exists()
                || std::fs::read(format!("/proc/{w}/cmdline")).is_ok_and(|c| c.is_empty())
        })
    });
}
