//! Distributed training with real processes on loopback: N workers train exactly what one
//! process trains, every row is used exactly once, and bad peers are refused while the run goes
//! on. Every process a test starts is killed when the test ends, pass or fail.

mod common;

use common::{
    coordinator_cmd, curve, distance, elbo, ok, params, test_records, worker_cmd, Procs, LADDER,
    SMALL,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ELBO: &str = env!("CARGO_BIN_EXE_elbo");

#[test]
fn a_distributed_run_resumes_exactly_at_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let train = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--run-dir", dir.to_str().unwrap()];
        args.extend(SMALL);
        args.extend(extra);
        ok(elbo(&args, &cache))
    };
    let whole = tmp.path().join("whole");
    let all = train(&whole, &["--workers", "2"]);
    assert!(all.contains("trained 26 steps on 2 workers"), "{all}");
    let split = tmp.path().join("split");
    let first = train(&split, &["--set", "cluster.workers=3", "--max-steps", "11"]);
    assert!(first.contains("trained 11 steps on 3 workers"), "{first}");
    let rest = train(&split, &["--set", "cluster.workers=2"]);
    assert!(rest.contains("trained 15 steps on 2 workers"), "{rest}");
    let (a, b) = (
        params(&whole.join("checkpoints/step-000000026")),
        params(&split.join("checkpoints/step-000000026")),
    );
    for (name, want) in &a {
        for (x, y) in want.iter().zip(&b[name]) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{name}: {x} vs {y}"
            );
        }
    }
    assert_eq!(
        curve(&whole).len(),
        curve(&split).len(),
        "metrics redone, not repeated"
    );
}

#[test]
fn one_two_and_four_workers_train_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |world: u32| -> PathBuf {
        let dir = tmp.path().join(format!("world{world}"));
        let workers = format!("cluster.workers={world}");
        let mut args = vec![
            "train",
            "--run-dir",
            dir.to_str().unwrap(),
            "--set",
            &workers,
        ];
        args.extend(SMALL);
        let out = ok(elbo(&args, &cache));
        assert!(out.contains("trained 26 steps"), "{out}");
        dir
    };
    let one = run(1);
    let last = "checkpoints/step-000000026";
    let reference_curve = curve(&one);
    assert_eq!(reference_curve.len(), 26);
    for world in [2, 4] {
        let dir = run(world);
        assert_same_model(&one.join(last), &dir.join(last), &format!("world {world}"));
        let c = curve(&dir);
        assert_eq!(c.len(), reference_curve.len(), "world {world}");
        for ((s1, a), (s2, b)) in reference_curve.iter().zip(&c) {
            assert_eq!(s1, s2);
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "world {world}, step {s1}: −ELBO {b} vs {a}"
            );
        }
        // Test figures at the end of epoch 1 (rank 0's) and of the run, as one process has them.
        let (want, got) = (test_records(&one), test_records(&dir));
        let steps = |r: &[serde_json::Value]| -> Vec<u64> {
            r.iter().map(|r| r["step"].as_u64().unwrap()).collect()
        };
        assert_eq!(steps(&want), [13, 26]);
        assert_eq!(steps(&got), [13, 26], "world {world}");
        for (a, b) in want.iter().zip(&got) {
            let (a, b) = (
                a["test_neg_elbo"].as_f64().unwrap(),
                b["test_neg_elbo"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "world {world}: test −ELBO {b} vs {a}"
            );
        }
        assert!(
            dir.join("samples/samples.png").is_file(),
            "pictures are written"
        );
        let ck = std::fs::read_dir(dir.join("checkpoints")).unwrap().count();
        assert_eq!(ck, 3, "checkpoints at steps 10, 20 and 26");
    }
}

/// The parameters of two checkpoints agree within `1e-5` (relative, over all parameters).
fn assert_same_model(a: &Path, b: &Path, what: &str) {
    let rel = distance(a, b);
    assert!(
        rel < 1e-5,
        "{what}: parameters differ by {rel:e} (relative)"
    );
}

/// The run of `extra` settings at 1, 2 and 4 workers, and at 4 then 2 workers across a resume,
/// ends with the same parameters at step 30.
fn same_model_at_every_world_size(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let train = |name: &str, world: u32, max_steps: &str| -> PathBuf {
        let dir = tmp.path().join(name);
        let workers = format!("cluster.workers={world}");
        let mut args = vec!["train", "--run-dir", dir.to_str().unwrap()];
        args.extend(SMALL);
        args.extend(["--set", &workers]);
        args.extend(extra);
        args.extend(["--set", "train.epochs=3", "--max-steps", max_steps]);
        ok(elbo(&args, &cache));
        dir
    };
    let step30 = "checkpoints/step-000000030";
    let one = train("world1", 1, "30").join(step30);
    for world in [2, 4] {
        let dir = train(&format!("world{world}"), world, "30");
        assert_same_model(&one, &dir.join(step30), &format!("world {world}"));
    }
    train("resumed", 4, "15");
    let resumed = train("resumed", 2, "30");
    assert_same_model(&one, &resumed.join(step30), "4 workers, then 2");
}

/// Free bits clamp each latent dimension's mean KL over the *global* batch (its sums are
/// all-reduced before the loss), so N workers train what one process trains with them on too,
/// and a resume at another world size changes nothing. (Clamping each rank's share, as before,
/// made the gradients depend on how the batch was split.)
#[test]
fn free_bits_train_the_same_model_at_one_two_and_four_workers() {
    same_model_at_every_world_size(&["--set", "model.free_bits=0.5"]);
}

/// M2 on batches of labeled rows (4 kept per class, 8 a batch) beside unlabeled ones: its
/// means are normalised by the global batch's labeled and unlabeled counts, so any world size
/// trains the same model.
#[test]
fn m2_trains_the_same_model_at_one_two_and_four_workers() {
    same_model_at_every_world_size(&[
        "--set",
        "model.kind=m2",
        "--set",
        "model.m2.classes=3",
        "--set",
        "data.labeled_per_class=4",
        "--set",
        "data.labeled_per_batch=8",
    ]);
}

/// M1+M2: every worker loads the trained VAE and draws each row's features from the stream of
/// (step, row id), so N workers train the M2 one process trains on them.
#[test]
fn m2_on_a_vae_s_features_trains_the_same_model_at_one_two_and_four_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let mut args = vec!["train", "--run-dir", m1.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(["--max-steps", "20"]);
    ok(elbo(&args, &tmp.path().join("cache")));
    let base = format!("model.m2.features_from={}", m1.display());
    same_model_at_every_world_size(&[
        "--set",
        "model.kind=m2",
        "--set",
        "model.m2.classes=3",
        "--set",
        &base,
        "--set",
        "model.likelihood=gaussian_per_dim",
        "--set",
        "data.labeled_per_class=4",
        "--set",
        "data.labeled_per_batch=8",
    ]);
}

/// The conditional VAE (the sprites' shape as its label) trains the same model at any world
/// size too.
#[test]
fn a_conditional_vae_trains_the_same_model_at_one_two_and_four_workers() {
    same_model_at_every_world_size(&["--set", "model.kind=cvae", "--set", "model.cvae.classes=3"]);
}

/// The VQ-VAE: each step's code counts, sums and restart candidates ride in the all-reduce
/// with the gradients, and every replica applies the same EMA step and restarts, so the
/// codebook (a buffer, in the checkpoint) and the parameters agree at any world size — every
/// code dead at the start (threshold 2), so restarts run throughout.
///
/// Agreement is to float rounding (the world sizes sum the same gradients in other orders,
/// ~1e-7), and the nearest-code argmin is discontinuous: a position whose two nearest codes
/// are within that rounding of a tie can pick another code at another world size, after which
/// the runs drift apart like any two runs. The replicas of one run never differ (they apply the
/// same all-reduced bytes; the checksum checks it). These settings have no such near-tie in
/// their 30 steps (measured: 2.2e-7 apart at step 30; a flip shows as ≥ 1e-5).
#[test]
fn a_vq_vae_trains_the_same_model_and_codebook_at_one_two_and_four_workers() {
    let settings = vq_settings("vqvae", 16, 2);
    same_model_at_every_world_size(&settings.iter().map(String::as_str).collect::<Vec<_>>());
}

/// VQ-VAE-2: both levels' codebooks, k-means initialised on the first global batch (the
/// rounds' sums all-reduced in turn, the top level's before the bottom's) and then reduced in
/// the same all-reduce as the gradients, agree at any world size (8 codes a level and the
/// default threshold: 9e-7 apart at step 30; see above on near-ties).
#[test]
fn a_vq_vae_2_trains_the_same_model_and_codebooks_at_one_two_and_four_workers() {
    let mut settings = vq_settings("vqvae2", 8, 1);
    settings.extend(["--set".into(), "model.vqvae2.init=kmeans".into()]);
    same_model_at_every_world_size(&settings.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A small VQ model of `kind` on the test sprites: `codes` codes of D = 4 (per level),
/// restarts below `threshold`.
fn vq_settings(kind: &str, codes: u32, threshold: u32) -> Vec<String> {
    [
        format!("model.kind={kind}"),
        "model.architecture=conv".into(),
        "model.latent_dim=4".into(),
        format!("model.{kind}.codes={codes}"),
        format!("model.{kind}.channels=[8, 16]"),
        format!("model.{kind}.restart_threshold={threshold}"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// A prior over a VQ run's codes: every worker loads the VQ run and encodes its rows with it,
/// and N workers train the prior one process trains.
#[test]
fn a_code_prior_trains_the_same_model_at_one_two_and_four_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let vq = tmp.path().join("vq");
    let mut args = vec!["train", "--run-dir", vq.to_str().unwrap()];
    args.extend(SMALL);
    let settings = vq_settings("vqvae", 16, 2);
    args.extend(settings.iter().map(String::as_str));
    args.extend(["--max-steps", "20"]);
    ok(elbo(&args, &tmp.path().join("cache")));
    let base = format!("model.code_prior.vq_run={}", vq.display());
    same_model_at_every_world_size(&[
        "--set",
        "model.kind=code_prior",
        "--set",
        &base,
        "--set",
        "model.code_prior.channels=8",
        "--set",
        "model.code_prior.layers=2",
    ]);
}

/// The ladder VAE with free bits (clamped per latent dimension of every layer on the global
/// batch's mean KL) trains the same model at any world size.
#[test]
fn a_ladder_vae_with_free_bits_trains_the_same_model_at_one_two_and_four_workers() {
    same_model_at_every_world_size(&[&LADDER[..], &["--set", "model.free_bits=0.25"]].concat());
}

/// The ladder VAE with batch norm in every block (each layer's moments, and the sums its
/// gradient needs, over the global batch) and free bits trains the same model at any world
/// size, its running moments included. (Free bits low enough that the top layer's KL is
/// penalised: its posterior mean's bias feeds only a batch-normalised layer, which cancels any
/// shift, so with the KL clamped its true gradient is exactly zero and Adam would turn the
/// rounding of that zero — which differs with the split — into full steps.)
#[test]
fn a_ladder_vae_with_batch_norm_trains_the_same_model_at_one_two_and_four_workers() {
    let settings = [
        "--set",
        "model.ladder.batch_norm=true",
        "--set",
        "model.free_bits=0.02",
    ];
    same_model_at_every_world_size(&[&LADDER[..], &settings].concat());
}

/// Starts `elbo coordinator` on a free loopback port; returns its index and URL.
fn coordinator(procs: &mut Procs, run: &Path, cache: &Path, extra: &[&str]) -> (usize, String) {
    let i = procs.spawn(&mut coordinator_cmd("127.0.0.1:0", run, cache, extra));
    let mut stdout = BufReader::new(procs.0[i].stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("coordinator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (i, format!("http://{addr}"))
}

/// A worker of run "default" unless `extra` names another.
fn worker(url: &str, id: &str, cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = worker_cmd(Command::new(ELBO), url, id, cache);
    cmd.args(["--connect-timeout-s", "20"])
        .args(if extra.contains(&"--run-id") {
            &[][..]
        } else {
            &["--run-id", "default"][..]
        })
        .args(extra);
    cmd
}

#[test]
fn three_workers_use_every_row_exactly_once_on_uneven_row_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let data = tmp.path().join("data");
    ok(elbo(
        &[
            "data",
            "make-sprites",
            "--out",
            data.to_str().unwrap(),
            "--n",
            "1000",
        ]
        .into_iter()
        .chain(["--size", "32", "--row-group-size", "96"])
        .collect::<Vec<_>>(),
        &cache,
    ));
    let train = format!("data.train={}", data.join("train.parquet").display());
    let test = format!("data.test={}", data.join("test.parquet").display());
    let mut procs = Procs::default();
    let run = tmp.path().join("run");
    let set = [
        "--set",
        &train,
        "--set",
        &test,
        "--set",
        "cluster.workers=3",
    ];
    let (coord, url) = coordinator(&mut procs, &run, &cache, &set);
    let audits: Vec<PathBuf> = (0..3)
        .map(|r| tmp.path().join(format!("rows-{r}")))
        .collect();
    let workers: Vec<usize> = audits
        .iter()
        .enumerate()
        .map(|(r, audit)| {
            let id = format!("w{r}");
            let audit = audit.to_str().unwrap();
            procs.spawn(&mut worker(&url, &id, &cache, &["--audit-rows", audit]))
        })
        .collect();
    for w in workers {
        let (ok, err) = procs.wait(w, Duration::from_secs(120));
        assert!(ok, "worker failed: {err}");
    }
    let (ok, err) = procs.wait(coord, Duration::from_secs(30));
    assert!(ok, "coordinator failed: {err}");
    // 1000 rows, batch 48: 21 steps per epoch, 2 epochs.
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for audit in &audits {
        for line in std::fs::read_to_string(audit).unwrap().lines() {
            let id = line.split(' ').nth(2).expect("generation step id");
            *counts.entry(id.parse().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 1000, "every row is used");
    assert!(
        counts.values().all(|&c| c == 2),
        "each exactly once per epoch"
    );
    let per_rank: Vec<usize> = audits
        .iter()
        .map(|a| std::fs::read_to_string(a).unwrap().lines().count())
        .collect();
    assert!(
        per_rank.iter().all(|&n| n > 600),
        "work is shared: {per_rank:?}"
    );
}

#[test]
fn bad_workers_are_refused_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let other_config = tmp.path().join("other.toml");
    std::fs::write(&other_config, "[train]\nlr = 0.5\n").unwrap();
    let mut procs = Procs::default();
    let run = tmp.path().join("run");
    let (coord, url) = coordinator(&mut procs, &run, &cache, &["--set", "cluster.workers=2"]);
    let bad = [
        (
            {
                let mut c = worker(&url, "bad-token", &cache, &[]);
                c.env("ELBO_TOKEN", "wrong");
                c
            },
            "wrong token",
        ),
        (
            worker(&url, "bad-run", &cache, &["--run-id", "another"]),
            "run id",
        ),
        (
            worker(
                &url,
                "bad-config",
                &cache,
                &["--config", other_config.to_str().unwrap()],
            ),
            "config hash",
        ),
    ];
    for (mut cmd, expect) in bad {
        let i = procs.spawn(&mut cmd);
        let (ok, err) = procs.wait(i, Duration::from_secs(30));
        assert!(!ok, "a worker with a {expect} must be refused");
        assert!(err.contains(expect), "{expect}: {err}");
    }
    // Two workers under the same id: one is refused, the other trains with a third.
    let twins: Vec<usize> = (0..2)
        .map(|_| procs.spawn(&mut worker(&url, "twin", &cache, &[])))
        .collect();
    let other = procs.spawn(&mut worker(&url, "other", &cache, &[]));
    let results: Vec<(bool, String)> = twins
        .iter()
        .chain([&other])
        .map(|&i| procs.wait(i, Duration::from_secs(120)))
        .collect();
    let refused: Vec<&(bool, String)> = results[..2].iter().filter(|(ok, _)| !ok).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(refused[0].1.contains("already in the run"), "{results:?}");
    assert!(results[2].0, "{results:?}");
    let (ok, err) = procs.wait(coord, Duration::from_secs(30));
    assert!(ok, "the run finished despite the bad workers: {err}");
    assert!(run
        .join("checkpoints/step-000000026/model.safetensors")
        .is_file());
}

/// What a stranger who can reach the ports tries while a run trains, and how often each try
/// was refused with the status it calls for.
#[derive(Debug, Default)]
struct Attempts {
    /// Ring streams of valid-looking chunks without credentials, or with a made-up tag.
    ring: u32,
    /// Step reports with a made-up session credential.
    reports: u32,
}

/// Whether a call failed in transport or found the server going away, rather than being
/// answered.
fn transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        )
}

/// Throws valid-looking ring chunks at `peers` and forged step reports at the coordinator at
/// `url` until `stop` is raised; panics on any call that is not refused.
fn stranger(
    url: String,
    peers: Vec<std::net::SocketAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Attempts {
    use elbo_proto::auth;
    use elbo_proto::v1 as pb;
    fn request<T>(message: T, headers: &[(&'static str, String)]) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_secs(5));
        for (name, value) in headers {
            request.metadata_mut().insert(*name, value.parse().unwrap());
        }
        request
    }
    let chunk = pb::Chunk {
        generation: 1,
        from_rank: 1,
        phase: pb::Phase::ReduceScatter as i32,
        data: vec![0x41; 4096].into(),
        ..Default::default()
    };
    let made_up = "ab".repeat(auth::KEY_BYTES);
    let ring_headers = [
        vec![],
        vec![
            (auth::GENERATION, "1".to_string()),
            (auth::AUTHORIZATION, auth::bearer(&made_up)),
        ],
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut attempts = Attempts::default();
    runtime.block_on(async {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for peer in &peers {
                let Ok(mut client) =
                    pb::peer_client::PeerClient::connect(format!("http://{peer}")).await
                else {
                    continue;
                };
                for headers in &ring_headers {
                    let chunks = tokio_stream::iter(vec![chunk.clone(); 3]);
                    match client.ring(request(chunks, headers)).await {
                        Err(s) if s.code() == tonic::Code::Unauthenticated => attempts.ring += 1,
                        // No answer: the worker is not up yet, or gone.
                        Err(s) if transport_failure(&s) => {}
                        other => panic!("a stranger's ring stream was not refused: {other:?}"),
                    }
                }
            }
            if let Ok(mut client) =
                pb::coordinator_client::CoordinatorClient::connect(url.clone()).await
            {
                for session in 1..=2u64 {
                    let report = pb::StepReport {
                        session,
                        generation: 1,
                        terms: vec![pb::Term {
                            name: "loss".into(),
                            value: -1e9,
                        }],
                        applied: true,
                        ..Default::default()
                    };
                    let headers = [
                        (auth::SESSION, session.to_string()),
                        (auth::AUTHORIZATION, auth::bearer(&made_up)),
                    ];
                    match client.report(request(report, &headers)).await {
                        Err(s) if s.code() == tonic::Code::Unauthenticated => attempts.reports += 1,
                        other => panic!("a forged report was not refused: {other:?}"),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    attempts
}

/// A stranger who can reach every port throws valid-looking chunks at both workers' ring
/// servers and forged reports at the coordinator all through a run: every try is refused
/// before it is read, the workers log the refusals, and the run ends with the very model an
/// undisturbed run of the same world trains.
#[test]
fn strangers_without_credentials_are_refused_and_the_run_trains_what_it_would_have() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let set = ["--set", "cluster.workers=2", "--set", "train.epochs=4"];
    let quiet = tmp.path().join("quiet");
    let mut args = vec!["train", "--run-dir", quiet.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(set);
    ok(elbo(&args, &cache));
    let mut procs = Procs::default();
    let run = tmp.path().join("run");
    let (coord, url) = coordinator(&mut procs, &run, &cache, &set);
    let peers: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let (url, peers, stop) = (url.clone(), peers.clone(), stop.clone());
        std::thread::spawn(move || stranger(url, peers, stop))
    };
    let workers: Vec<usize> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            let listen = peer.to_string();
            let mut cmd = worker(&url, &format!("w{i}"), &cache, &["--listen", &listen]);
            cmd.env("ELBO_WORKER_THROTTLE_MS", "20");
            procs.spawn(&mut cmd)
        })
        .collect();
    let logs: Vec<String> = workers
        .iter()
        .map(|&w| {
            let (ok, err) = procs.wait(w, Duration::from_secs(120));
            assert!(ok, "a worker failed: {err}");
            err
        })
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = attacker.join().expect("every stranger's call was refused");
    let (ok, err) = procs.wait(coord, Duration::from_secs(30));
    assert!(ok, "the run finished: {err}");
    assert!(attempts.ring > 0 && attempts.reports > 0, "{attempts:?}");
    assert!(
        logs.iter().any(|l| l.contains("refused a ring stream")),
        "the workers log what they refuse: {logs:?}"
    );
    assert!(
        err.contains("refused a call"),
        "the coordinator logs it too: {err}"
    );
    let step = "checkpoints/step-000000052";
    assert_same_model(&quiet.join(step), &run.join(step), "with a stranger about");
}

#[test]
fn worker_flags_are_checked_before_anything_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Exit 2: flags that cannot work; exit 1: what failed while trying (elbo's convention).
    let cases: [(&[&str], &str, i32); 6] = [
        (
            &["--coordinator", "localhost:1"],
            "expected http://HOST:PORT",
            2,
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--connect-timeout-s",
                "0.3",
            ],
            "cannot reach the coordinator",
            1,
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--connect-timeout-s=-1",
            ],
            "--connect-timeout-s",
            2,
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--listen",
                "0.0.0.0:0",
            ],
            "--advertise",
            2,
        ),
        (
            &["--coordinator", "http://127.0.0.1:1", "--device", "tpu"],
            "expected cpu or cuda:N",
            2,
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--audit-rows",
                "/nonexistent/dir/rows",
            ],
            "cannot open --audit-rows",
            1,
        ),
    ];
    for (flags, expect, code) in cases {
        let mut args = vec!["worker", "--run-id", "r"];
        args.extend(flags);
        let out = elbo(&args, &cache);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{flags:?}: {err}");
        assert!(err.contains(expect), "{flags:?}: {err}");
    }
}

/// Writes a fresh CA (`ca.crt`) and a certificate it signs for 127.0.0.1 (`tls.crt`, `tls.key`:
/// cert-manager's names) into `dir`; returns the `[cluster.tls]` settings that name them.
fn certificates(dir: &Path, mutual: bool) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let files = [
        ("ca", "ca.crt", ca.pem()),
        ("cert", "tls.crt", cert.pem()),
        ("key", "tls.key", key.serialize_pem()),
    ];
    let mut set = Vec::new();
    for (field, name, pem) in files {
        std::fs::write(dir.join(name), pem).unwrap();
        set.push("--set".to_string());
        set.push(format!("cluster.tls.{field}={}", dir.join(name).display()));
    }
    set.extend(["--set".to_string(), format!("cluster.tls.mutual={mutual}")]);
    set
}

/// `elbo train` over mutual TLS (the coordinator and its workers, the ring) trains exactly what
/// the same run trains in plaintext; a worker that speaks plaintext to a TLS coordinator is
/// refused with an error that says so, and the run goes on.
#[test]
fn a_run_over_mutual_tls_trains_what_a_plaintext_run_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let tls = certificates(&tmp.path().join("tls"), true);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let train = |name: &str, extra: &[&str]| -> PathBuf {
        let dir = tmp.path().join(name);
        let mut args = vec!["train", "--run-dir", dir.to_str().unwrap()];
        args.extend(SMALL);
        args.extend(["--set", "cluster.workers=2"]);
        args.extend(extra);
        ok(elbo(&args, &cache));
        dir
    };
    let step = "checkpoints/step-000000026";
    let plain = train("plain", &[]);
    let secure = train("tls", &tls);
    assert_same_model(&plain.join(step), &secure.join(step), "over TLS");

    let mut procs = Procs::default();
    let run = tmp.path().join("run");
    let mut set = vec!["--set", "cluster.workers=1"];
    set.extend(&tls);
    let (coord, url) = coordinator(&mut procs, &run, &cache, &set);
    let plaintext = procs.spawn(&mut worker(&url, "plain", &cache, &[]));
    let (ok, err) = procs.wait(plaintext, Duration::from_secs(60));
    assert!(!ok, "a plaintext worker must be refused");
    assert!(err.contains("coordinator"), "{err}");
    let https = url.replacen("http://", "https://", 1);
    let tls_flags = [
        "--tls-cert",
        tls[3].split_once('=').unwrap().1,
        "--tls-key",
        tls[5].split_once('=').unwrap().1,
        "--tls-ca",
        tls[1].split_once('=').unwrap().1,
        "--tls-mutual",
    ];
    let secure = procs.spawn(&mut worker(&https, "secure", &cache, &tls_flags));
    let (ok, err) = procs.wait(secure, Duration::from_secs(120));
    assert!(ok, "a worker with the run's certificates trains: {err}");
    let (ok, err) = procs.wait(coord, Duration::from_secs(30));
    assert!(ok, "the run finished: {err}");
}
