//! The training step, the non-finite guard, and checkpoints.

use candle_core::Device;
use elbo_datasets::{Batch, Cursor};
use elbo_models::{Activation, Architecture, LikelihoodKind, ModelSpec, Objective, Vae};
use elbo_settings::OptimizerKind;
use elbo_worker::checkpoint::{self, TrainState};
use elbo_worker::{LocalReduce, OptimizerConfig, Schedule, StepConfig, Trainer, WorkerError};

/// A small MLP VAE on 8-value examples with Adam at 1e-2.
fn trainer_with(latent_dim: usize, seed: u64) -> Trainer {
    let spec = ModelSpec {
        input_shape: vec![8],
        latent_dim,
        architecture: Architecture::Mlp,
        hidden: vec![6],
        activation: Activation::Relu,
        likelihood: LikelihoodKind::Bernoulli,
        variance: 1.0,
        log_var_clamp: 8.0,
        objective: Objective::default(),
    };
    let model = Vae::new(spec, &Device::Cpu, seed).unwrap();
    let config = StepConfig {
        optimizer: OptimizerConfig::defaults(OptimizerKind::Adam),
        lr: 1e-2,
        schedule: Schedule::constant(),
        clip_norm: 0.0,
        max_nonfinite: 3,
        seed,
    };
    Trainer::new(Box::new(model), config).unwrap()
}

fn trainer(seed: u64) -> Trainer {
    trainer_with(2, seed)
}

fn batch(step: u64, poison: bool) -> Batch {
    let mut x: Vec<f32> = (0..32)
        .map(|i| ((i * 7 + step as usize) % 5) as f32 / 4.0)
        .collect();
    if poison {
        x[3] = f32::NAN;
    }
    Batch {
        x,
        dim: 8,
        labels: vec![None; 4],
        ids: vec![0, 1, 2, 3],
        global_rows: 4,
        cursor_after: Cursor {
            epoch: 0,
            step: step + 1,
        },
    }
}

#[test]
fn training_lowers_the_loss() {
    let mut t = trainer(1);
    let first = t
        .train_step(&batch(0, false), &mut LocalReduce, &Device::Cpu)
        .unwrap();
    let mut last = first.clone();
    for s in 1..200 {
        last = t
            .train_step(&batch(s % 4, false), &mut LocalReduce, &Device::Cpu)
            .unwrap();
    }
    assert!(first.applied && last.applied);
    assert!(
        last.terms["neg_elbo"] < first.terms["neg_elbo"] - 0.5,
        "{} → {}",
        first.terms["neg_elbo"],
        last.terms["neg_elbo"]
    );
    for key in ["rec", "kl", "neg_elbo", "loss", "kl_weight"] {
        assert!(last.terms.contains_key(key), "term {key} reported");
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let mut t = trainer(2);
    let before = t.params().to_vec();
    let r = t
        .train_step(&batch(0, true), &mut LocalReduce, &Device::Cpu)
        .unwrap();
    assert!(!r.applied);
    assert_eq!(t.params(), &before[..], "a skipped step changes nothing");
    assert!(
        t.train_step(&batch(1, false), &mut LocalReduce, &Device::Cpu)
            .unwrap()
            .applied,
        "the count resets"
    );
    t.train_step(&batch(2, true), &mut LocalReduce, &Device::Cpu)
        .unwrap();
    t.train_step(&batch(3, true), &mut LocalReduce, &Device::Cpu)
        .unwrap();
    match t.train_step(&batch(4, true), &mut LocalReduce, &Device::Cpu) {
        Err(
            e @ WorkerError::NonFinite {
                count: 3, step: 4, ..
            },
        ) => {
            let msg = e.to_string();
            assert!(
                msg.contains("step 4") && msg.contains("loss terms"),
                "{msg}"
            );
        }
        other => panic!("expected a non-finite stop, got {other:?}"),
    }
    assert_eq!(t.nonfinite_total(), 4);
}

fn state(t: &Trainer) -> TrainState {
    TrainState {
        format: checkpoint::FORMAT,
        step: t.step(),
        cursor: cursor(t),
        nonfinite_total: t.nonfinite_total(),
        optimizer_step: t.optimizer().state().step,
        seed: 1,
        config_sha256: "abc".into(),
    }
}

fn cursor(t: &Trainer) -> Cursor {
    Cursor {
        epoch: 0,
        step: t.step(),
    }
}

/// Writes the trainer's checkpoint into `dir`, keeping `keep`.
fn save(dir: &std::path::Path, t: &Trainer, keep: usize) -> std::path::PathBuf {
    let files = t.checkpoint_files(cursor(t), 1, "abc").unwrap();
    checkpoint::write(dir, &files, keep).unwrap()
}

/// Reads a checkpoint directory for the trainer's model.
fn load(dir: &std::path::Path, t: &Trainer) -> elbo_worker::Result<checkpoint::Checkpoint> {
    t.decode(&checkpoint::read(dir)?, dir)
}

#[test]
fn checkpoints_round_trip_deterministically_and_keep_the_newest() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut t = trainer(3);
    let mut saved = Vec::new();
    for s in 0..5 {
        t.train_step(&batch(s, false), &mut LocalReduce, &Device::Cpu)
            .unwrap();
        saved.push(save(a.path(), &t, 2));
    }
    let kept = checkpoint::list(a.path()).unwrap();
    assert_eq!(kept, saved[3..]);
    let again = save(b.path(), &t, 2);
    for f in ["model.safetensors", "optim.safetensors", "state.json"] {
        assert_eq!(
            std::fs::read(saved[4].join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f} is byte-identical"
        );
    }
    let ck = load(&saved[4], &t).unwrap();
    assert_eq!(ck.params, t.params());
    assert_eq!(&ck.optimizer, t.optimizer().state());
    assert_eq!(ck.state, state(&t));

    // Resuming continues exactly like the uninterrupted trainer.
    let mut resumed = trainer(3);
    assert_eq!(resumed.restore(ck).unwrap(), cursor(&t));
    for s in 5..8 {
        let x = t
            .train_step(&batch(s, false), &mut LocalReduce, &Device::Cpu)
            .unwrap();
        let y = resumed
            .train_step(&batch(s, false), &mut LocalReduce, &Device::Cpu)
            .unwrap();
        assert_eq!(x.terms, y.terms);
    }
    assert_eq!(t.params(), resumed.params());
}

#[test]
fn a_checkpoint_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer(4);
    let saved = save(dir.path(), &t, 1);
    let other = trainer_with(3, 0);
    let err = load(&saved, &other).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("decoder.0.weight is F32[6, 2], the model expects F32[6, 3]"),
        "{err}"
    );
    std::fs::write(saved.join("state.json"), "{").unwrap();
    assert!(load(&saved, &t)
        .unwrap_err()
        .to_string()
        .contains("state.json"));
}
