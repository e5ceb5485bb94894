//! The training step, the non-finite guard, and checkpoints.

use candle_core::Device;
use elbo_datasets::{Batch, Cursor};
use elbo_models::{Activation, Architecture, LikelihoodKind, ModelSpec, Objective, Vae};
use elbo_settings::OptimizerKind;
use elbo_worker::checkpoint::{self, TrainState};
use elbo_worker::{
    LocalReduce, OptimizerConfig, Reduce, Schedule, StepConfig, Trainer, WorkerError,
};

/// A small MLP VAE on 8-value examples with Adam at 1e-2.
fn trainer_with(latent_dim: usize, seed: u64) -> Trainer {
    let optimizer = OptimizerConfig::defaults(OptimizerKind::Adam);
    trainer_from(latent_dim, seed, optimizer, 0.0)
}

/// The small MLP VAE with the given optimiser and clipping.
fn trainer_from(latent_dim: usize, seed: u64, optimizer: OptimizerConfig, clip: f64) -> Trainer {
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
        optimizer,
        lr: 1e-2,
        schedule: Schedule::constant(),
        clip_norm: clip,
        max_nonfinite: 3,
        seed,
    };
    Trainer::new(Box::new(model), config).unwrap()
}

fn trainer(seed: u64) -> Trainer {
    trainer_with(2, seed)
}

/// A two-rank all-reduce whose ranks hold the same buffer (the sum doubles it): the buffer goes
/// through the host as in a real multi-process step.
struct Mirrored;

impl Reduce for Mirrored {
    fn world(&self) -> u32 {
        2
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> elbo_worker::Result<()> {
        buf.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }
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
    let before = t.params().unwrap();
    let r = t
        .train_step(&batch(0, true), &mut LocalReduce, &Device::Cpu)
        .unwrap();
    assert!(!r.applied);
    assert_eq!(
        t.params().unwrap(),
        before,
        "a skipped step changes nothing"
    );
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
        optimizer_step: t.optimizer().state().unwrap().step,
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
    assert_eq!(ck.params, t.params().unwrap());
    assert_eq!(ck.optimizer, t.optimizer().state().unwrap());
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
    assert_eq!(t.params().unwrap(), resumed.params().unwrap());
}

/// The step a GPU model takes — flat device tensors, the update composed of tensor ops, the
/// packed buffer through the host only for a multi-process all-reduce — run on the CPU against
/// the host loop: same terms, same parameters, same optimiser state, in one process and two,
/// for every optimiser, with clipping and weight decay; and its checkpoints resume on the host.
#[test]
fn the_device_step_matches_the_host_step() {
    let optimizers = [
        (OptimizerKind::Adam, 0.0, 0.0),
        (OptimizerKind::Adam, 1e-2, 0.5),
        (OptimizerKind::Adamw, 1e-2, 0.0),
        (OptimizerKind::Sgd, 1e-2, 0.5),
    ];
    for (kind, weight_decay, clip) in optimizers {
        for world in [1u64, 2] {
            let optimizer = OptimizerConfig {
                weight_decay,
                ..OptimizerConfig::defaults(kind)
            };
            let mut host = trainer_from(2, 5, optimizer, clip);
            let mut device = trainer_from(2, 5, optimizer, clip)
                .keep_on_device()
                .unwrap();
            let case = format!("{kind:?}, decay {weight_decay}, clip {clip}, world {world}");
            for s in 0..12 {
                let mut b = batch(s % 4, s == 6);
                b.global_rows *= world;
                let (x, y) = if world == 1 {
                    (
                        host.train_step(&b, &mut LocalReduce, &Device::Cpu),
                        device.train_step(&b, &mut LocalReduce, &Device::Cpu),
                    )
                } else {
                    (
                        host.train_step(&b, &mut Mirrored, &Device::Cpu),
                        device.train_step(&b, &mut Mirrored, &Device::Cpu),
                    )
                };
                let (x, y) = (x.unwrap(), y.unwrap());
                assert_eq!(x.applied, y.applied, "{case}, step {s}");
                assert_eq!(
                    x.terms.keys().collect::<Vec<_>>(),
                    y.terms.keys().collect::<Vec<_>>()
                );
                for (k, v) in &x.terms {
                    let w = y.terms[k];
                    assert!(
                        (v - w).abs() <= 1e-5 * (1.0 + v.abs()) || (v.is_nan() && w.is_nan()),
                        "{case}, step {s}, {k}: host {v} vs device {w}"
                    );
                }
            }
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len());
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                        "{case}: {what}[{i}] host {a} vs device {b}"
                    );
                }
            };
            close(
                &host.params().unwrap(),
                &device.params().unwrap(),
                "parameters",
            );
            let (ho, dv) = (
                host.optimizer().state().unwrap(),
                device.optimizer().state().unwrap(),
            );
            assert_eq!(ho.step, dv.step, "{case}");
            for (name, values) in &ho.buffers {
                close(values, &dv.buffers[name], name);
            }
            // The device trainer's checkpoint resumes on the host trainer and vice versa.
            let files = device.checkpoint_files(cursor(&device), 1, "abc").unwrap();
            let ck = device.decode(&files, std::path::Path::new("mem")).unwrap();
            let mut resumed = trainer_from(2, 5, optimizer, clip);
            resumed.restore(ck).unwrap();
            let mut back = trainer_from(2, 5, optimizer, clip)
                .keep_on_device()
                .unwrap();
            let files = host.checkpoint_files(cursor(&host), 1, "abc").unwrap();
            back.restore(host.decode(&files, std::path::Path::new("mem")).unwrap())
                .unwrap();
            let b = batch(1, false);
            for t in [&mut host, &mut device, &mut resumed, &mut back] {
                t.train_step(&b, &mut LocalReduce, &Device::Cpu).unwrap();
            }
            close(
                &device.params().unwrap(),
                &resumed.params().unwrap(),
                "resumed on host",
            );
            close(
                &host.params().unwrap(),
                &back.params().unwrap(),
                "resumed on device",
            );
        }
    }
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
