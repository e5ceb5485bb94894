//! End-to-end tests of the `elbo` binary: config resolution, data commands, bad input.

use std::path::Path;
use std::process::{Command, Output};

fn elbo(args: &[&str], envs: &[(&str, &str)], cache: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elbo"));
    cmd.args(args)
        .env("ELBO_CACHE_DIR", cache)
        .env("ELBO_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the elbo binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts a clean failure with exit `code` (no panic) and returns stderr.
fn exits(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// A failure while working (bad data, I/O): exit 1.
fn fails(out: &Output) -> String {
    exits(out, 1)
}

/// A command line or config that cannot work as given: exit 2.
fn refused(out: &Output) -> String {
    exits(out, 2)
}

#[test]
fn config_show_layers_file_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[train]\nbatch_size = 64\nepochs = 2\n[run]\nname = \"exp\"\n",
    )
    .unwrap();
    let out = ok(&elbo(
        &[
            "config",
            "show",
            "--config",
            file.to_str().unwrap(),
            "--set",
            "train.lr=0.01",
        ],
        &[("ELBO__TRAIN__BATCH_SIZE", "256")],
        dir.path(),
    ));
    let shown: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(shown["train"]["batch_size"].as_integer(), Some(256));
    assert_eq!(shown["train"]["epochs"].as_integer(), Some(2));
    assert_eq!(shown["train"]["lr"].as_float(), Some(0.01));
    assert_eq!(shown["run"]["dir"].as_str(), Some("runs/exp"));
    let keys = ok(&elbo(&["config", "keys"], &[], dir.path()));
    for key in [
        "run.name",
        "run.dir",
        "run.seed",
        "data.train",
        "data.test",
        "data.binarize",
        "train.epochs",
        "train.batch_size",
        "train.optimizer",
        "train.lr",
        "model.kind",
        "model.latent_dim",
        "cluster.workers",
    ] {
        assert!(keys.lines().any(|l| l == key), "missing key {key}");
    }
}

#[test]
fn config_typos_are_errors_naming_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&elbo(
        &["config", "show", "--set", "train.batchsize=3"],
        &[],
        dir.path(),
    ));
    assert!(
        err.contains("train.batchsize")
            && err.contains("--set")
            && err.contains("train.batch_size"),
        "{err}"
    );
    let err = refused(&elbo(
        &["config", "show"],
        &[("ELBO__MODEL__LATENT", "3")],
        dir.path(),
    ));
    assert!(
        err.contains("model.latent") && err.contains("ELBO__MODEL__LATENT"),
        "{err}"
    );
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[Train]\nlr = 0.1\n").unwrap();
    let err = refused(&elbo(
        &["config", "show", "--config", file.to_str().unwrap()],
        &[],
        dir.path(),
    ));
    assert!(err.contains("c.toml"), "{err}");
}

#[test]
fn config_models_lists_the_registered_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&elbo(&["config", "models"], &[], dir.path()));
    let kinds: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let builtin = elbo_models::Registry::builtin().kinds();
    assert_eq!(kinds, builtin, "{out}");
    for kind in [
        "beta_vae",
        "code_prior",
        "cvae",
        "ladder",
        "m2",
        "vae",
        "vqvae",
        "vqvae2",
    ] {
        assert!(kinds.contains(&kind), "{kind}");
    }
    let err = refused(&elbo(
        &["config", "show", "--set", "model.kind=gan"],
        &[],
        dir.path(),
    ));
    let expected = format!("expected one of: {}", builtin.join(", "));
    assert!(
        err.contains("model.kind") && err.contains(&expected),
        "{err}"
    );
}

#[test]
fn make_sprites_then_inspect_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sprites");
    ok(&elbo(
        &[
            "data",
            "make-sprites",
            "--out",
            out.to_str().unwrap(),
            "--n",
            "500",
            "--size",
            "32",
            "--row-group-size",
            "128",
        ],
        &[],
        dir.path(),
    ));
    let json = ok(&elbo(
        &[
            "data",
            "inspect",
            out.join("train.parquet").to_str().unwrap(),
            "--json",
        ],
        &[],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rows"], 500);
    assert_eq!(v["row_groups"], 4);
    assert_eq!(v["shape"], serde_json::json!([1, 32, 32]));
    assert_eq!(v["labeled"], 500);
    assert_eq!(v["x_max"], 1.0);
    let text = ok(&elbo(
        &["data", "inspect", out.to_str().unwrap()],
        &[],
        dir.path(),
    ));
    assert!(text.contains("rows        550"), "{text}");
}

#[test]
fn convert_idx_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = vec![0, 0, 8, 3, 0, 0, 0, 50, 0, 0, 0, 4, 0, 0, 0, 4];
    img.extend((0..50 * 16).map(|i| (i % 256) as u8));
    let mut lab = vec![0, 0, 8, 1, 0, 0, 0, 50];
    lab.extend((0..50).map(|i| (i % 10) as u8));
    let (i, l, o) = (
        dir.path().join("img.idx"),
        dir.path().join("lab.idx"),
        dir.path().join("d.parquet"),
    );
    std::fs::write(&i, img).unwrap();
    std::fs::write(&l, lab).unwrap();
    let args = [
        "data",
        "convert",
        "--format",
        "idx",
        "--images",
        i.to_str().unwrap(),
        "--labels",
        l.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ];
    let said = ok(&elbo(&args, &[], dir.path()));
    assert!(
        said.contains("wrote 50 rows of shape 1,4,4 (50 labeled)"),
        "{said}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&elbo(
        &["data", "inspect", o.to_str().unwrap(), "--json"],
        &[],
        dir.path(),
    )))
    .unwrap();
    assert_eq!(
        (v["rows"].as_u64(), v["label_histogram"]["9"].as_u64()),
        (Some(50), Some(5))
    );
}

#[test]
fn bad_input_fails_cleanly_naming_the_file_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, "not parquet").unwrap();
    let err = fails(&elbo(
        &["data", "inspect", junk.to_str().unwrap()],
        &[],
        dir.path(),
    ));
    assert!(err.contains("junk.parquet"), "{err}");
    let err = fails(&elbo(
        &["data", "inspect", "/nonexistent/x.parquet"],
        &[],
        dir.path(),
    ));
    assert!(err.contains("/nonexistent/x.parquet"), "{err}");

    let img = dir.path().join("img.idx");
    std::fs::write(&img, [0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 5]).unwrap();
    let out = dir.path().join("out.parquet");
    let err = fails(&elbo(
        &[
            "data",
            "convert",
            "--format",
            "idx",
            "--images",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    ));
    assert!(
        err.contains("img.idx") && err.contains("magic number"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the inputs remain: {left:?}");

    let err = refused(&elbo(
        &[
            "data",
            "convert",
            "--format",
            "idx",
            "--images",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shape",
            "1,2",
        ],
        &[],
        dir.path(),
    ));
    assert!(err.contains("--shape"), "{err}");
    let err = fails(&elbo(
        &[
            "data",
            "make-sprites",
            "--out",
            dir.path().join("s").to_str().unwrap(),
            "--size",
            "48",
        ],
        &[],
        dir.path(),
    ));
    assert!(err.contains("expected 32 or 64"), "{err}");
}

#[test]
fn bench_data_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = ok(&elbo(
        &[
            "bench",
            "data",
            "--rows",
            "3000",
            "--repeats",
            "1",
            "--json",
        ],
        &[],
        dir.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rows"], 3000);
    assert_eq!(v["dim"], 784);
    assert!(v["rows_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["mb_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_train_times_the_model_a_config_describes() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |args: &[&str]| {
        let mut all = vec![
            "bench",
            "train",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--json",
        ];
        all.extend(args);
        elbo(&all, &[], dir.path())
    };
    for (args, model) in [
        (&[][..], "mlp-vae 784-400-20 bernoulli adam"),
        (
            &["--set", "model.kind=m2", "--shape", "1,8,8"][..],
            "m2 1,8,8 mlp 109306 params z 16 bernoulli",
        ),
        // (784 + 10)·400 + 400, 2·(400·16 + 16), (16 + 10)·400 + 400, 400·784 + 784: the
        // label's one-hot code beside the input and the latent. Named by the parent of 2 ranks.
        (
            &["--set", "model.kind=cvae", "--workers", "2"][..],
            "cvae 1,28,28 mlp 656016 params z 16 bernoulli",
        ),
    ] {
        let v: serde_json::Value = serde_json::from_str(&ok(&bench(args))).unwrap();
        assert_eq!(v["model"], model, "{args:?}");
        assert!(v["samples_per_s"].as_f64().unwrap() > 0.0, "{args:?}");
        assert!(v["final_loss"].as_f64().unwrap().is_finite(), "{args:?}");
    }
    let err = refused(&bench(&["--shape", "1,8,8"]));
    assert!(
        err.contains("--shape applies to a configured model"),
        "{err}"
    );
    let err = refused(&bench(&["--set", "model.kind=gan"]));
    assert!(err.contains("model.kind"), "{err}");
    let err = refused(&bench(&["--set", "model.kind=m2", "--shape", "1,x"]));
    assert!(err.contains("--shape"), "{err}");
}

#[test]
fn every_shipped_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            ok(&elbo(
                &["config", "show", "--config", path.to_str().unwrap()],
                &[],
                dir.path(),
            ));
            seen += 1;
        }
    }
    assert!(seen >= 2, "configs/ holds {seen} files");
}

#[test]
fn tls_files_are_checked_before_anything_listens() {
    let tmp = tempfile::tempdir().unwrap();
    let not_pem = tmp.path().join("notes.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let missing = tmp.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let run_dir = tmp.path().join("run");
    for (cert, expect) in [
        (
            missing,
            vec!["cluster.tls.cert", "missing.pem", "cannot read"],
        ),
        (not_pem, vec!["cluster.tls.cert", "no PEM CERTIFICATE"]),
    ] {
        let (c, k, a) = (
            format!("cluster.tls.cert={cert}"),
            format!("cluster.tls.key={not_pem}"),
            format!("cluster.tls.ca={not_pem}"),
        );
        let out = elbo(
            &[
                "train",
                "--workers",
                "2",
                "--run-dir",
                run_dir.to_str().unwrap(),
                "--set",
                &c,
                "--set",
                &k,
                "--set",
                &a,
            ],
            &[],
            tmp.path(),
        );
        let err = refused(&out);
        assert!(expect.iter().all(|e| err.contains(e)), "{err}");
        assert!(!run_dir.exists(), "nothing written");
    }
    let worker = elbo(
        &[
            "worker",
            "--coordinator",
            "https://127.0.0.1:9",
            "--run-id",
            "x",
            "--tls-cert",
            missing,
            "--tls-key",
            not_pem,
            "--tls-ca",
            not_pem,
        ],
        &[],
        tmp.path(),
    );
    let err = refused(&worker);
    assert!(
        err.contains("--tls-cert") && err.contains("missing.pem"),
        "{err}"
    );
}

#[test]
fn workers_is_given_once_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let both = elbo(
        &["train", "--workers", "2", "--set", "cluster.workers=3"],
        &[],
        tmp.path(),
    );
    let err = refused(&both);
    assert!(
        err.contains("--workers 2") && err.contains("cluster.workers"),
        "{err}"
    );
    let zero = refused(&elbo(&["train", "--workers", "0"], &[], tmp.path()));
    assert!(zero.contains("cluster.workers"), "{zero}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = elbo(
        &[
            "train",
            "--run-dir",
            run.to_str().unwrap(),
            "--max-steps",
            "2",
            "--set",
            "data.sprites.n=300",
            "--set",
            "model.hidden=16",
        ],
        &[("ELBO_LOG", "info")],
        tmp.path(),
    );
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("training"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}
