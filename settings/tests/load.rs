//! Layering and error reporting of the config.

use std::path::PathBuf;

use elbo_datasets::Binarize;
use elbo_models::{
    BuildContext, Model, ModelError, ModelSpec, Registry, Section, SectionError, Variant,
};
use elbo_settings::{known_keys, Config, Layers, OptimizerKind, Origin, SettingsError};
use serde::{Deserialize, Serialize};

/// `[model.demo]`: a section of every shape the loader types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Demo {
    rate: f64,
    codes: u32,
    ema: bool,
    name: String,
    sizes: Vec<u32>,
    extra: Vec<u32>,
}

impl Default for Demo {
    fn default() -> Self {
        Demo {
            rate: 0.25,
            codes: 8,
            ema: true,
            name: "a".into(),
            sizes: vec![2, 3],
            extra: Vec::new(),
        }
    }
}

impl Section for Demo {
    fn validate(&self) -> Result<(), SectionError> {
        if self.codes == 0 {
            return Err(SectionError::new(
                "codes",
                "found 0, expected at least one code",
            ));
        }
        Ok(())
    }
}

/// A variant the loader learns of from the registry alone (never built here).
struct DemoModel;

impl Variant for DemoModel {
    const KIND: &'static str = "demo";
    const ABOUT: &'static str = "a section for the loader's tests";
    type Config = Demo;

    fn build(_: &ModelSpec, _: &Demo, _: &BuildContext) -> Result<Box<dyn Model>, ModelError> {
        Err(ModelError::Spec("not built in these tests".into()))
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register::<DemoModel>();
    r
}

fn load(layers: &Layers) -> Result<Config, SettingsError> {
    elbo_settings::load(layers, &registry())
}

fn demo(cfg: &Config) -> Demo {
    toml::Value::Table(cfg.model.section()).try_into().unwrap()
}

fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn flags(f: &[&str]) -> Vec<String> {
    f.iter().map(|s| s.to_string()).collect()
}

#[test]
fn defaults_resolve_the_run_directory() {
    let cfg = load(&Layers::default()).unwrap();
    let mut want = Config::default();
    want.run.dir = "runs/default".into();
    assert_eq!(cfg, want);
}

#[test]
fn layers_apply_in_order_file_env_flags() {
    let (_d, path) = file("[train]\nbatch_size = 64\nlr = 0.01\nepochs = 3\n[model]\nkind = \"beta_vae\"\n[data]\nbinarize = \"dynamic\"\n");
    let layers = Layers {
        file: Some(path),
        env: env(&[
            ("ELBO__TRAIN__BATCH_SIZE", "256"),
            ("ELBO__TRAIN__LR", "0.5"),
            ("HOME", "/x"),
            ("ELBO_LOG", "debug"),
        ]),
        flags: flags(&[
            "train.lr=0.002",
            "run.name=exp1",
            "train.optimizer=sgd",
            "train.optimizer=adamw",
        ]),
    };
    let cfg = load(&layers).unwrap();
    assert_eq!(cfg.train.epochs, 3, "file");
    assert_eq!(cfg.train.batch_size, 256, "env over file");
    assert_eq!(cfg.train.lr, 0.002, "flag over env");
    assert_eq!(cfg.train.optimizer, OptimizerKind::Adamw, "last flag wins");
    assert_eq!(cfg.model.kind, "beta_vae");
    assert_eq!(cfg.data.binarize, Binarize::Dynamic);
    assert_eq!(cfg.run.dir, "runs/exp1");
    assert_eq!(
        cfg.model.latent_dim,
        Config::default().model.latent_dim,
        "untouched keys keep defaults"
    );
}

#[test]
fn show_output_round_trips() {
    let layers = Layers {
        flags: flags(&["cluster.workers=4", "data.sprites.size=64"]),
        ..Default::default()
    };
    let cfg = load(&layers).unwrap();
    let (_d, path) = file(&cfg.to_toml());
    assert_eq!(
        load(&Layers {
            file: Some(path),
            ..Default::default()
        })
        .unwrap(),
        cfg
    );
}

fn unknown(layers: &Layers) -> (String, Origin, String) {
    match load(layers).unwrap_err() {
        SettingsError::UnknownKey { key, origin, hint } => (key, origin, hint),
        other => panic!("expected an unknown key, got {other}"),
    }
}

#[test]
fn unknown_keys_name_the_key_and_the_source() {
    let (_d, path) = file("[train]\nbatchsize = 64\n");
    let (key, origin, hint) = unknown(&Layers {
        file: Some(path.clone()),
        ..Default::default()
    });
    assert_eq!(
        (key.as_str(), origin),
        ("train.batchsize", Origin::File(path))
    );
    assert!(hint.contains("did you mean `train.batch_size`"), "{hint}");

    let (key, origin, _) = unknown(&Layers {
        env: env(&[("ELBO__TRAIN__BACTH_SIZE", "1")]),
        ..Default::default()
    });
    assert_eq!(
        (key.as_str(), origin),
        (
            "train.bacth_size",
            Origin::Env("ELBO__TRAIN__BACTH_SIZE".into())
        )
    );

    let (key, origin, _) = unknown(&Layers {
        flags: flags(&["modle.kind=vae"]),
        ..Default::default()
    });
    assert_eq!(
        (key.as_str(), origin),
        ("modle.kind", Origin::Flag("modle.kind=vae".into()))
    );

    let (key, _, hint) = unknown(&Layers {
        flags: flags(&["train=1"]),
        ..Default::default()
    });
    assert_eq!(key, "train");
    assert!(hint.contains("is a section"), "{hint}");
}

fn invalid(layers: &Layers) -> String {
    match load(layers).unwrap_err() {
        e @ SettingsError::Invalid { .. } => e.to_string(),
        other => panic!("expected an invalid value, got {other}"),
    }
}

#[test]
fn wrong_types_name_the_key_the_source_and_the_expectation() {
    let (_d, path) = file("[train]\nepochs = \"ten\"\n");
    let msg = invalid(&Layers {
        file: Some(path),
        ..Default::default()
    });
    assert!(
        msg.contains("`train.epochs`")
            && msg.contains("run.toml")
            && msg.contains("expected an integer"),
        "{msg}"
    );

    let msg = invalid(&Layers {
        env: env(&[("ELBO__TRAIN__BATCH_SIZE", "lots")]),
        ..Default::default()
    });
    assert!(
        msg.contains("`train.batch_size`")
            && msg.contains("ELBO__TRAIN__BATCH_SIZE")
            && msg.contains("\"lots\""),
        "{msg}"
    );

    let msg = invalid(&Layers {
        flags: flags(&["model.kind=gan"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.kind`")
            && msg.contains("--set model.kind=gan")
            && msg.contains(&registry().kinds().join(", ")),
        "{msg}"
    );

    let msg = invalid(&Layers {
        flags: flags(&["model.activation=relux"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.activation`") && msg.contains("expected one of: relu, tanh, gelu"),
        "the choices come from the enum itself: {msg}"
    );

    let msg = invalid(&Layers {
        flags: flags(&["model.kind=vqvae", "model.vqvae.init=kmean"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.vqvae.init`")
            && msg.contains("--set model.vqvae.init=kmean")
            && msg.contains("`uniform` or `kmeans`"),
        "a model section's choice is named with its key and origin: {msg}"
    );

    let msg = invalid(&Layers {
        flags: flags(&["train.batch_size=0"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`train.batch_size`") && msg.contains("positive"),
        "{msg}"
    );

    let msg = invalid(&Layers {
        flags: flags(&["train.lr=-1"]),
        ..Default::default()
    });
    assert!(msg.contains("`train.lr`"), "{msg}");

    let msg = invalid(&Layers {
        flags: flags(&["run.name=../x"]),
        ..Default::default()
    });
    assert!(msg.contains("`run.name`"), "{msg}");

    let msg = invalid(&Layers {
        flags: flags(&["data.sprites.size=48"]),
        ..Default::default()
    });
    assert!(msg.contains("expected 32 or 64"), "{msg}");

    for (set, key, expect) in [
        (
            &["cluster.tls.cert=a.pem", "cluster.tls.key=k.pem"][..],
            "cluster.tls.ca",
            "together",
        ),
        (
            &["cluster.tls.mutual=true"],
            "cluster.tls.mutual",
            "without TLS",
        ),
        (
            &["cluster.tls.server_name=elbo"],
            "cluster.tls.server_name",
            "without TLS",
        ),
        (
            &[
                "cluster.tls.cert=c",
                "cluster.tls.key=k",
                "cluster.tls.ca=a",
                "cluster.tls.server_name=a b",
            ],
            "cluster.tls.server_name",
            "DNS name",
        ),
    ] {
        let msg = invalid(&Layers {
            flags: flags(set),
            ..Default::default()
        });
        assert!(
            msg.contains(&format!("`{key}`")) && msg.contains(expect),
            "{set:?}: {msg}"
        );
    }

    for (depth, expect) in [("0", "positive"), ("65", "at most 64")] {
        let msg = invalid(&Layers {
            flags: flags(&[&format!("cluster.ring_depth={depth}")]),
            ..Default::default()
        });
        assert!(
            msg.contains("`cluster.ring_depth`") && msg.contains(expect),
            "{msg}"
        );
    }
}

#[test]
fn malformed_inputs() {
    assert!(matches!(
        load(&Layers {
            flags: flags(&["train.lr"]),
            ..Default::default()
        }),
        Err(SettingsError::BadFlag(_))
    ));
    assert!(matches!(
        load(&Layers {
            flags: flags(&["=3"]),
            ..Default::default()
        }),
        Err(SettingsError::BadFlag(_))
    ));
    let missing = Layers {
        file: Some("/nonexistent/run.toml".into()),
        ..Default::default()
    };
    assert!(matches!(load(&missing), Err(SettingsError::File { .. })));
    let (_d, path) = file("[train\nlr = 1");
    let err = load(&Layers {
        file: Some(path),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, SettingsError::File { .. }), "{err}");
}

#[test]
fn a_variant_section_is_typed_from_its_defaults_in_every_layer() {
    let (_d, path) =
        file("[model]\nkind = \"demo\"\n[model.demo]\nname = \"from-file\"\nrate = 1\n");
    let cfg = load(&Layers {
        file: Some(path),
        env: env(&[
            ("ELBO__MODEL__DEMO__CODES", "16"),
            ("ELBO__MODEL__DEMO__SIZES", "4,5,6"),
            ("ELBO__MODEL__DEMO__EXTRA", "7,8"),
        ]),
        flags: flags(&["model.demo.rate=0.5", "model.demo.ema=false"]),
    })
    .unwrap();
    assert_eq!(
        demo(&cfg),
        Demo {
            rate: 0.5,
            codes: 16,
            ema: false,
            name: "from-file".into(),
            sizes: vec![4, 5, 6],
            extra: vec![7, 8],
        },
        "a list whose default is empty is read as written"
    );
    let from_flag = load(&Layers {
        flags: flags(&["model.kind=demo", "model.demo.extra=[9]"]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(demo(&from_flag).extra, [9]);
    let only_kind = load(&Layers {
        flags: flags(&["model.kind=demo"]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        demo(&only_kind),
        Demo::default(),
        "unset keys keep their defaults"
    );
    let shown = cfg.to_toml();
    assert!(shown.contains("[model.demo]"), "{shown}");
    let (_d2, path) = file(&shown);
    let again = load(&Layers {
        file: Some(path),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(again, cfg, "config show round-trips the section");
    let keys = known_keys(&registry());
    for key in [
        "model.demo.rate",
        "model.demo.sizes",
        "model.kind",
        "train.lr",
    ] {
        assert!(keys.contains(&key.to_string()), "{key} in {keys:?}");
    }
}

#[test]
fn bad_section_values_name_the_key_the_source_and_the_expectation() {
    let msg = invalid(&Layers {
        flags: flags(&["model.kind=demo", "model.demo.rate=fast"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.demo.rate`")
            && msg.contains("--set model.demo.rate=fast")
            && msg.contains("expected a number"),
        "{msg}"
    );
    let msg = invalid(&Layers {
        env: env(&[("ELBO__MODEL__DEMO__CODES", "0")]),
        flags: flags(&["model.kind=demo"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.demo.codes`")
            && msg.contains("ELBO__MODEL__DEMO__CODES")
            && msg.contains("at least one code"),
        "the variant's own range check: {msg}"
    );
    let msg = invalid(&Layers {
        flags: flags(&["model.demo.rate=0.5"]),
        ..Default::default()
    });
    assert!(
        msg.contains("`model.demo.rate`") && msg.contains("but model.kind = \"vae\""),
        "a key of another variant's section is not silently ignored: {msg}"
    );
    let (key, origin, hint) = unknown(&Layers {
        flags: flags(&["model.kind=demo", "model.demo.rat=1"]),
        ..Default::default()
    });
    assert_eq!(key, "model.demo.rat");
    assert_eq!(origin, Origin::Flag("model.demo.rat=1".into()));
    assert!(hint.contains("did you mean `model.demo.rate`"), "{hint}");
    let (key, _, hint) = unknown(&Layers {
        flags: flags(&["model.vae.rate=1"]),
        ..Default::default()
    });
    assert_eq!(key, "model.vae.rate");
    assert!(hint.contains("[model.vae] has no keys"), "{hint}");
    let (_d, path) = file("[model]\nkind = \"vae\"\n[model.vae]\n");
    let empty = load(&Layers {
        file: Some(path),
        ..Default::default()
    });
    assert_eq!(
        empty.unwrap().model.section,
        None,
        "an empty section is allowed"
    );
    assert!(!known_keys(&registry()).contains(&"model.vae".to_string()));
}
