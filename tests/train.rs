//! End-to-end training runs of the `elbo` binary: exact resume, config checks, eval, sample.

mod common;

use common::{elbo, ok, records, test_records, Procs, LADDER};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A small, fast run: 600 sprites of 32×32, batch 50 (12 steps per epoch), 3 epochs.
const SMALL: [&str; 14] = [
    "--set",
    "data.sprites.n=600",
    "--set",
    "train.batch_size=50",
    "--set",
    "train.epochs=3",
    "--set",
    "model.hidden=64",
    "--set",
    "train.log_every=4",
    "--set",
    "data.binarize=dynamic",
    "--set",
    "train.checkpoint_every=5",
];

fn train(run: &Path, cache: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--run-dir", run.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(extra);
    elbo(&args, cache)
}

/// The files of a run's newest checkpoint.
fn final_checkpoint(run: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    ["model.safetensors", "optim.safetensors", "state.json"]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                std::fs::read(dir.join(f))
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display())),
            )
        })
        .collect()
}

/// The model tensors (parameters and buffers) of a run's newest checkpoint, by name.
fn newest_model_tensors(run: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    elbo_worker::checkpoint::model_tensors(&newest).unwrap()
}

/// Trains the small run of `extra` settings whole, and again stopped mid-epoch (step 17 of
/// 36, not on a checkpoint boundary) and resumed: the final checkpoints are byte-identical and
/// the loss curves equal. Returns the run directories (whole, resumed).
fn resume_is_exact(tmp: &Path, cache: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let (whole, split) = (tmp.join("whole"), tmp.join("split"));
    ok(train(&whole, cache, extra));
    let mut first = extra.to_vec();
    first.extend(["--max-steps", "17"]);
    let said = ok(train(&split, cache, &first));
    assert!(said.contains("trained 17 steps"), "{said}");
    assert!(
        !split.join("samples").exists(),
        "no pictures before the run is complete"
    );
    ok(train(&split, cache, extra));
    for ((file, a), (_, b)) in final_checkpoint(&whole)
        .iter()
        .zip(final_checkpoint(&split))
    {
        assert!(
            *a == b,
            "{file} differs between the uninterrupted and the resumed run ({extra:?})"
        );
    }
    let metrics = |run: &Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("samples_per_s");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(metrics(&whole), metrics(&split), "the loss curves match");
    (whole, split)
}

#[test]
fn resuming_reproduces_the_uninterrupted_run_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, _) = resume_is_exact(
        tmp.path(),
        &tmp.path().join("cache"),
        &["--set", "eval.every=5"],
    );
    // Test figures every 5 steps, and at the end (36 steps), identical across the resume.
    let tests: Vec<u64> = test_records(&whole)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(tests, [5, 10, 15, 20, 25, 30, 35, 36]);
    for png in [
        "samples.png",
        "reconstructions.png",
        "traversals.png",
        "loss.png",
    ] {
        let bytes = std::fs::read(whole.join("samples").join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is a PNG");
    }
    let kept = std::fs::read_dir(whole.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(kept, 3, "train.keep_checkpoints = 3");
}

#[test]
fn resuming_with_a_changed_config_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    ok(train(&run, &cache, &["--max-steps", "6"]));
    let out = train(
        &run,
        &cache,
        &["--set", "train.lr=0.01", "--set", "model.beta=2"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.lr: 0.001 → 0.01")
            && err.contains("model.beta: 1.0 → 2.0")
            && err.contains("--force"),
        "{err}"
    );
    let said = ok(train(
        &run,
        &cache,
        &["--set", "train.lr=0.01", "--force", "--max-steps", "8"],
    ));
    assert!(said.contains("trained 2 steps"), "{said}");
}

#[test]
fn eval_and_sample_a_trained_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    ok(train(&run, &cache, &[]));
    let json = ok(elbo(
        &[
            "eval",
            "--run-dir",
            run.to_str().unwrap(),
            "--iw-samples",
            "20",
            "--json",
        ],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (neg_elbo, rec, kl, nll) = (
        v["neg_elbo"].as_f64().unwrap(),
        v["rec"].as_f64().unwrap(),
        v["kl"].as_f64().unwrap(),
        v["nll_iw"].as_f64().unwrap(),
    );
    assert_eq!(v["rows"], 60);
    assert!((neg_elbo - rec - kl).abs() < 1e-3);
    assert!(
        nll <= neg_elbo + 0.5,
        "the IW bound is at least as tight as the ELBO: {nll} vs {neg_elbo}"
    );
    assert!(v["active_units"].as_u64().unwrap() <= 16);
    let png = tmp.path().join("grid.png");
    ok(elbo(
        &[
            "sample",
            "--run-dir",
            run.to_str().unwrap(),
            "--n",
            "16",
            "--out",
            png.to_str().unwrap(),
        ],
        &cache,
    ));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let out = elbo(
        &[
            "eval",
            "--run-dir",
            tmp.path().join("nothing").to_str().unwrap(),
        ],
        &cache,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no config.toml"));
}

#[test]
fn unavailable_choices_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for (set, expect) in [
        ("model.kind=gan", "model.kind"),
        ("model.kind=vqvae", "model.architecture"),
        ("cluster.min_workers=9", "cluster.min_workers"),
    ] {
        let out = train(&tmp.path().join("r"), &cache, &["--set", set]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect));
    }
    let out = train(&tmp.path().join("r"), &cache, &["--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu or cuda:N"));
}

#[test]
fn a_short_sprites_run_learns() {
    // Measured (seeds 0, 1, 2): test −ELBO 99.1, 114.1, 103.9 nats after these 192 steps, from
    // ≈ 710 untrained. The bar leaves a wide margin for platform float differences.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let args = [
        "train",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "data.sprites.n=2000",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.epochs=6",
        "--set",
        "model.hidden=128",
        "--set",
        "model.latent_dim=8",
    ];
    let said = ok(elbo(&args, &cache));
    let neg_elbo: f64 = said
        .lines()
        .find_map(|l| l.strip_prefix("test −ELBO "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no test −ELBO in {said}"));
    assert!(
        neg_elbo < 130.0,
        "test −ELBO {neg_elbo} nats is above the bar of 130"
    );
    // The test figures at each epoch's end (eval.every = 0), the last one the run's result.
    let tests = test_records(&run);
    let epochs: Vec<u64> = tests.iter().map(|r| r["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, [1, 2, 3, 4, 5, 6]);
    let last_step = records(&run).last().unwrap()["step"].as_u64();
    assert_eq!(tests[5]["step"].as_u64(), last_step);
    let curve: Vec<f64> = tests
        .iter()
        .map(|r| r["test_neg_elbo"].as_f64().unwrap())
        .collect();
    assert!(
        (curve[5] - neg_elbo).abs() < 0.1,
        "the last test record is the run's result: {curve:?} vs {neg_elbo}"
    );
    assert!(curve[5] < curve[0], "the test −ELBO falls: {curve:?}");
}

#[test]
fn a_conditional_vae_samples_by_class_and_refuses_data_it_cannot_use() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cvae = ["--set", "model.kind=cvae", "--set", "model.cvae.classes=3"];
    let run = tmp.path().join("cvae");
    let said = ok(train(&run, &cache, &cvae));
    assert!(said.contains("trained 36 steps"), "{said}");
    let json = ok(elbo(
        &[
            "eval",
            "--run-dir",
            run.to_str().unwrap(),
            "--iw-samples",
            "10",
            "--json",
        ],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["nll_iw"].as_f64().unwrap() <= v["neg_elbo"].as_f64().unwrap() + 0.5,
        "the conditional IW bound: {v}"
    );
    let png = tmp.path().join("hearts.png");
    let sample = |label: &str| {
        let args = [
            "sample",
            "--run-dir",
            run.to_str().unwrap(),
            "--n",
            "9",
            "--label",
            label,
            "--out",
            png.to_str().unwrap(),
        ];
        elbo(&args, &cache)
    };
    assert!(ok(sample("2")).contains("wrote 9 samples"));
    let out = sample("3");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--label 3: expected a class in 0..3"));
    let rows = ok(elbo(
        &[
            "sample",
            "--run-dir",
            run.to_str().unwrap(),
            "--n",
            "30",
            "--out",
            png.to_str().unwrap(),
        ],
        &cache,
    ));
    assert!(
        rows.contains("wrote 30 samples"),
        "one row of 10 per class: {rows}"
    );

    // Sprites carry labels 0 to 2: two classes are refused before training starts.
    let out = train(
        &tmp.path().join("two"),
        &cache,
        &["--set", "model.kind=cvae", "--set", "model.cvae.classes=2"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has 2 classes, but data.train holds label 2"),
        "{err}"
    );
    assert!(
        !tmp.path().join("two/metrics.jsonl").exists(),
        "nothing trained"
    );

    // Data without labels.
    let csv = tmp.path().join("x.csv");
    let rows: Vec<String> = (0..20)
        .map(|i| format!("{},{},{},{}", i % 2, (i + 1) % 2, 1, 0))
        .collect();
    std::fs::write(&csv, rows.join("\n")).unwrap();
    let data = tmp.path().join("x.parquet");
    ok(elbo(
        &[
            "data",
            "convert",
            "--format",
            "csv",
            "--input",
            csv.to_str().unwrap(),
            "--shape",
            "1,2,2",
            "--out",
            data.to_str().unwrap(),
        ],
        &cache,
    ));
    let spec = data.to_str().unwrap();
    let (train_key, test_key) = (format!("data.train={spec}"), format!("data.test={spec}"));
    for (kind, expect) in [
        (
            "model.kind=cvae",
            "needs a label on every row, but data.train has 20 unlabeled rows of 20",
        ),
        (
            "model.kind=m2",
            "needs labeled rows, but data.train has none",
        ),
    ] {
        let args = [
            "--set",
            kind,
            "--set",
            &train_key,
            "--set",
            &test_key,
            "--set",
            "train.batch_size=4",
        ];
        let out = train(&tmp.path().join("unlabeled"), &cache, &args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{kind}: {err}");
    }

    // A model that reads no labels takes no --label.
    let vae = tmp.path().join("vae");
    ok(train(&vae, &cache, &["--max-steps", "2"]));
    let out = elbo(
        &[
            "sample",
            "--run-dir",
            vae.to_str().unwrap(),
            "--label",
            "1",
            "--out",
            png.to_str().unwrap(),
        ],
        &cache,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("this model does not read labels"));
}

#[test]
fn conditional_and_semi_supervised_runs_resume_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cvae = ["--set", "model.kind=cvae", "--set", "model.cvae.classes=3"];
    resume_is_exact(&tmp.path().join("cvae"), &cache, &cvae);
    let m2 = [
        "--set",
        "model.kind=m2",
        "--set",
        "model.m2.classes=3",
        "--set",
        "data.labeled_per_class=4",
        "--set",
        "data.labeled_per_batch=10",
    ];
    let (whole, _) = resume_is_exact(&tmp.path().join("m2"), &cache, &m2);
    assert!(
        whole.join("samples/analogies.png").is_file(),
        "M2 draws its analogies"
    );
}

/// M1+M2: M2 trained on a VAE run's features resumes byte for byte (its checkpoint holds its
/// own parameters, of a model of the features), reports its classifier's test
/// accuracy, samples and draws its analogies through the VAE, and refuses a base it cannot use.
#[test]
fn m2_on_a_vae_s_features_trains_resumes_and_draws_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let m1 = tmp.path().join("m1");
    ok(train(&m1, &cache, &["--set", "model.latent_dim=6"]));
    // M2 on the features of the run `base`, modelled by `likelihood`.
    let m2 = |base: &Path, likelihood: &str| -> Vec<String> {
        [
            "model.kind=m2".to_string(),
            "model.m2.classes=3".into(),
            format!("model.m2.features_from={}", base.display()),
            format!("model.likelihood={likelihood}"),
            "data.labeled_per_class=4".into(),
            "data.labeled_per_batch=10".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    let args = m2(&m1, "gaussian_per_dim");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (whole, _) = resume_is_exact(&tmp.path().join("m1m2"), &cache, &args);
    // M2 models the 6 features: a variance per feature, not per pixel.
    assert_eq!(newest_model_tensors(&whole)["likelihood.log_var"].len(), 6);
    let json = ok(elbo(
        &["eval", "--run-dir", whole.to_str().unwrap(), "--json"],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let accuracy = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{json}");
    for picture in ["analogies", "samples", "reconstructions"] {
        assert!(
            whole.join(format!("samples/{picture}.png")).is_file(),
            "{picture}"
        );
    }
    let png = tmp.path().join("twos.png");
    let said = ok(elbo(
        &[
            "sample",
            "--run-dir",
            whole.to_str().unwrap(),
            "--label",
            "2",
            "--n",
            "8",
            "--out",
            png.to_str().unwrap(),
        ],
        &cache,
    ));
    assert!(said.contains("wrote 8 samples") && png.is_file(), "{said}");

    let refused = |base: &Path, likelihood: &str, expect: &str| {
        let args = m2(base, likelihood);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = train(&tmp.path().join("refused"), &cache, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{err}");
    };
    refused(
        &m1,
        "bernoulli",
        "model.likelihood = \"bernoulli\" models values in [0, 1]",
    );
    refused(
        &tmp.path().join("nowhere"),
        "gaussian_per_dim",
        "not a run directory",
    );
    let cvae = tmp.path().join("cvae");
    let cvae_args = ["--set", "model.kind=cvae", "--set", "model.cvae.classes=3"];
    ok(train(
        &cvae,
        &cache,
        &[&cvae_args[..], &["--max-steps", "1"]].concat(),
    ));
    refused(
        &cvae,
        "gaussian_per_dim",
        "no continuous latent to read without a label",
    );
    assert!(!tmp.path().join("refused/metrics.jsonl").exists());
}

/// A small VQ-VAE's settings: every code dies quickly (threshold 2), so restarts happen on
/// most steps of the run.
const VQVAE: [&str; 12] = [
    "--set",
    "model.kind=vqvae",
    "--set",
    "model.architecture=conv",
    "--set",
    "model.latent_dim=4",
    "--set",
    "model.vqvae.codes=16",
    "--set",
    "model.vqvae.channels=[8, 16]",
    "--set",
    "model.vqvae.restart_threshold=2",
];

/// A VQ-VAE (and a VQ-VAE-2, its codebooks k-means initialised) stopped mid-run resumes byte
/// for byte — its EMA codebooks, counts and sums, and that the initialisation is done, are in
/// the checkpoint — draws its codes and their usage, and `elbo eval` reports reconstruction and
/// code usage over the test set.
#[test]
fn a_vq_vae_resumes_byte_for_byte_and_reports_its_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut two: Vec<String> = VQVAE
        .iter()
        .map(|s| {
            s.replace("=vqvae", "=vqvae2")
                .replace(".vqvae.", ".vqvae2.")
        })
        .collect();
    two.extend(["--set".into(), "model.vqvae2.init=kmeans".into()]);
    let two: Vec<&str> = two.iter().map(String::as_str).collect();
    let (levels, _) = resume_is_exact(&tmp.path().join("two"), &cache, &two);
    let tensors = newest_model_tensors(&levels);
    for level in ["bottom", "top"] {
        let pending = &tensors[&format!("quantiser.{level}.kmeans_pending")];
        assert_eq!(
            pending,
            &vec![0.0],
            "{level}: initialised, and checkpointed so"
        );
    }
    for picture in ["code_usage_bottom", "code_usage_top"] {
        assert!(levels.join(format!("samples/{picture}.png")).is_file());
    }
    let (whole, _) = resume_is_exact(&tmp.path().join("one"), &cache, &VQVAE);
    for picture in ["codes", "code_usage", "samples", "reconstructions"] {
        let png = whole.join(format!("samples/{picture}.png"));
        assert!(png.is_file(), "{}", png.display());
    }
    let tensors = newest_model_tensors(&whole);
    for buffer in [
        "quantiser.codebook",
        "quantiser.ema_count",
        "quantiser.ema_sum",
    ] {
        assert!(tensors.contains_key(buffer), "{buffer} is checkpointed");
    }
    let json = ok(elbo(
        &["eval", "--run-dir", whole.to_str().unwrap(), "--json"],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let used = v["codes_used"].as_u64().unwrap();
    assert!((2..=16).contains(&used), "codes used {used}");
    assert_eq!(v["codes"], 16);
    let (mse, perplexity) = (
        v["mse"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    assert!(mse > 0.0 && mse < 0.25, "mse {mse}");
    assert!(
        perplexity >= 1.0 && perplexity <= used as f64,
        "perplexity {perplexity}"
    );
    let records = records(&whole);
    let last = records
        .iter()
        .rev()
        .find(|r| r.get("loss").is_some())
        .unwrap();
    assert!(last["codes_alive"].as_f64().unwrap() >= 1.0, "{last}");
}

/// A ladder VAE resumes byte for byte, writes a traversal picture per layer, and `elbo eval`
/// reports the KL and active units of each layer beside the IW bound over all layers.
/// A prior over a trained VQ-VAE's codes trains on the codes its encoder gives, resumes byte
/// for byte (its checkpoint holds only its own parameters), reports bits per code position
/// below the uniform prior's, samples through the VQ run, and refuses a base it cannot use.
#[test]
fn a_code_prior_trains_on_a_vq_run_and_samples_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let vq = tmp.path().join("vq");
    ok(train(&vq, &cache, &VQVAE));
    let base = format!("model.code_prior.vq_run={}", vq.display());
    let prior = [
        "--set",
        "model.kind=code_prior",
        "--set",
        &base,
        "--set",
        "model.code_prior.channels=8",
        "--set",
        "model.code_prior.layers=3",
    ];
    let (whole, split) = resume_is_exact(&tmp.path().join("prior"), &cache, &prior);
    let tensors = newest_model_tensors(&whole);
    assert!(
        tensors.keys().all(|k| k.starts_with("prior.")),
        "only the prior's parameters: {:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    let json = ok(elbo(
        &["eval", "--run-dir", whole.to_str().unwrap(), "--json"],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let bits = v["bits_per_dim"].as_f64().unwrap();
    assert!(
        bits > 0.0 && bits < 4.0,
        "bits per code {bits} (uniform over 16: 4)"
    );
    let positions = 8.0 * 8.0;
    let nll = v["nll"].as_f64().unwrap();
    assert!((nll - bits * positions * std::f64::consts::LN_2).abs() < 1e-6 * nll);
    let png = tmp.path().join("grid.png");
    let said = ok(elbo(
        &[
            "sample",
            "--run-dir",
            whole.to_str().unwrap(),
            "--n",
            "16",
            "--out",
            png.to_str().unwrap(),
        ],
        &cache,
    ));
    assert!(said.contains("wrote 16 samples") && png.is_file(), "{said}");

    let refused = |vq_run: &Path, expect: &str| {
        let base = format!("model.code_prior.vq_run={}", vq_run.display());
        let run = tmp.path().join("refused");
        let out = train(
            &run,
            &cache,
            &["--set", "model.kind=code_prior", "--set", &base],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{err}");
    };
    refused(&tmp.path().join("nowhere"), "not a run directory");
    refused(&split, "builds on another run itself");
    let vae = tmp.path().join("vae");
    ok(train(&vae, &cache, &["--max-steps", "1"]));
    refused(&vae, "no code grids");
}

/// The ladder, batch-normalised: stopped and resumed, it ends byte for byte where the run that
/// never stopped ends, its running moments included.
#[test]
fn a_ladder_vae_resumes_byte_for_byte_and_reports_each_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let settings = [
        "--set",
        "model.kl_warmup_steps=10",
        "--set",
        "model.ladder.batch_norm=true",
    ];
    let ladder = [&LADDER[..], &settings].concat();
    let (whole, _) = resume_is_exact(tmp.path(), &cache, &ladder);
    for picture in [
        "traversals_layer1",
        "traversals_layer2",
        "traversals",
        "samples",
    ] {
        assert!(
            whole.join(format!("samples/{picture}.png")).is_file(),
            "{picture}"
        );
    }
    let json = ok(elbo(
        &[
            "eval",
            "--run-dir",
            whole.to_str().unwrap(),
            "--iw-samples",
            "20",
            "--json",
        ],
        &cache,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kl: Vec<f64> = v["kl_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_f64().unwrap())
        .collect();
    assert_eq!(kl.len(), 2);
    assert!((kl.iter().sum::<f64>() - v["kl"].as_f64().unwrap()).abs() < 1e-6);
    assert_eq!(v["active_units_layers"].as_array().unwrap().len(), 2);
    let (nll, neg_elbo) = (
        v["nll_iw"].as_f64().unwrap(),
        v["neg_elbo"].as_f64().unwrap(),
    );
    assert!(
        nll < neg_elbo,
        "the IW bound {nll} is tighter than the ELBO {neg_elbo}"
    );
    let last = records(&whole)
        .into_iter()
        .rev()
        .find(|r| r.get("loss").is_some())
        .unwrap();
    assert!(last["kl_layer1"].as_f64().is_some() && last["kl_layer2"].as_f64().is_some());
}

#[test]
fn semi_supervised_runs_refuse_data_they_cannot_use() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Exit 2 for a config that cannot work, 1 for data that does not fit it (elbo's convention).
    let m2 = |extra: &[&str], code: i32| {
        let mut args = vec!["--set", "model.kind=m2", "--set", "model.m2.classes=3"];
        args.extend(extra);
        let out = train(&tmp.path().join("r"), &cache, &args);
        assert_eq!(out.status.code(), Some(code), "{extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = m2(&["--set", "data.labeled_per_class=1000"], 1);
    assert!(
        err.contains("1000 labeled rows per class asked for, but class"),
        "{err}"
    );
    let err = m2(&["--set", "data.labeled_per_batch=50"], 2);
    assert!(
        err.contains("data.labeled_per_batch") && err.contains("fewer than train.batch_size = 50"),
        "{err}"
    );
    let err = m2(&["--set", "model.m2.classes=2"], 2);
    assert!(
        err.contains("has 2 classes, but data.train holds label 2"),
        "{err}"
    );
    assert!(
        !tmp.path().join("r/metrics.jsonl").exists(),
        "nothing trained"
    );
}

/// One scrape of `http://addr/metrics`, parsed (`None` while nothing answers).
fn scrape(addr: &str) -> Option<prometheus_parse::Scrape> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: elbo\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let body = response.split_once("\r\n\r\n")?.1;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()
}

fn gauge(scrape: &prometheus_parse::Scrape, name: &str) -> Option<f64> {
    scrape.samples.iter().find_map(|s| match s.value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v)
            if s.metric == name =>
        {
            Some(v)
        }
        _ => None,
    })
}

/// `--metrics-addr`: scraped mid-run, a two-worker run's coordinator reports its committed
/// step, world size, throughput and loss terms in the Prometheus text format.
#[test]
fn a_running_job_serves_prometheus_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let run = tmp.path().join("run");
    let mut procs = Procs::default();
    procs.spawn(
        Command::new(env!("CARGO_BIN_EXE_elbo"))
            .args([
                "train",
                "--workers",
                "2",
                "--metrics-addr",
                &addr,
                "--run-dir",
            ])
            .arg(&run)
            .args(["--set", "data.sprites.n=20000", "--set", "train.epochs=50"])
            .env("ELBO_CACHE_DIR", tmp.path().join("cache"))
            .env("ELBO_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let scraped = loop {
        assert!(
            Instant::now() < deadline,
            "no committed step scraped from {addr}"
        );
        if let Some(s) = scrape(&addr).filter(|s| gauge(s, "elbo_step").unwrap_or(0.0) >= 3.0) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(gauge(&scraped, "elbo_world_size"), Some(2.0));
    assert_eq!(
        gauge(&scraped, "elbo_total_steps"),
        Some(7850.0),
        "157 steps per epoch, 50 epochs"
    );
    assert!(gauge(&scraped, "elbo_samples_total").unwrap() >= 3.0 * 128.0);
    let loss = scraped
        .samples
        .iter()
        .find(|s| s.metric == "elbo_loss" && s.labels.get("term") == Some("neg_elbo"))
        .expect("the −ELBO term");
    assert!(matches!(loss.value, prometheus_parse::Value::Gauge(v) if v > 0.0 && v.is_finite()));
}
