//! On a GPU: every model kind computes the CPU's loss and gradients, and training on the GPU
//! tracks training on the CPU. Compiled only in a CUDA build (`--features cuda`) and run on a
//! machine with a GPU by `scripts/gpu_check.sh`; there, no GPU is a failure, not a skip.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use elbo_datasets::{Batch, Cursor, DataSchema, PixelType};
use elbo_engine::{step_config, Engine};
use elbo_models::{whole_batch_statistics, Input, LabelUse, Model, Noise, Registry, StepContext};
use elbo_settings::Layers;
use elbo_worker::{LocalReduce, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every model kind, MLP and convolutional, as its example config builds it.
const CASES: &[(&str, &[&str])] = &[
    ("vae-mnist.toml", &[]),
    (
        "vae-mnist.toml",
        &["model.architecture=conv", "model.hidden=[256]"],
    ),
    ("vae-mnist.toml", &["model.likelihood=gaussian_per_dim"]),
    ("vae-mnist.toml", &["model.free_bits=0.5"]),
    ("beta-vae-sprites.toml", &[]),
    ("cvae-mnist.toml", &[]),
    (
        "cvae-mnist.toml",
        &["model.architecture=conv", "model.hidden=[256]"],
    ),
    ("m2-mnist.toml", &[]),
    (
        "m2-mnist.toml",
        &["model.architecture=conv", "model.hidden=[256]"],
    ),
    ("ladder-mnist.toml", &[]),
    ("ladder-mnist.toml", &["model.ladder.batch_norm=true"]),
    ("ladder-mnist.toml", &["model.architecture=conv"]),
];

const SHAPE: [usize; 3] = [1, 28, 28];

fn engine() -> Engine {
    let cache = std::env::temp_dir().join("elbo-gpu-test-cache");
    Engine::new(Registry::builtin(), cache)
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device 0 (this test runs on a machine with a GPU)")
}

fn config(file: &str, set: &[&str]) -> elbo_settings::Config {
    // cargo runs tests in the package's folder, scripts/gpu_check.sh in the repository's.
    let configs = ["configs", "../configs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .expect("the example configs (run from the repository or the engine folder)");
    let file = configs.join(file);
    engine()
        .load_config(&Layers {
            file: Some(file),
            flags: set.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .expect("example config")
}

fn model(file: &str, set: &[&str], device: &Device) -> Box<dyn Model> {
    let schema = DataSchema {
        shape: SHAPE.to_vec(),
        dim: SHAPE.iter().product(),
        pixel: PixelType::Uint8,
        has_label: true,
        has_id: true,
    };
    engine()
        .model(&config(file, set), &schema, device)
        .expect("model")
}

/// A fixed binary batch with labels as the model uses them (half labelled when partial).
fn batch(rows: usize, labels: LabelUse, seed: u64) -> Batch {
    let dim: usize = SHAPE.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = (0..rows * dim)
        .map(|_| f32::from(u8::from(rng.random::<f32>() < 0.3)))
        .collect();
    let labels = (0..rows)
        .map(|r| match labels {
            LabelUse::Ignored => None,
            LabelUse::Every { classes } => Some(rng.random_range(0..classes as i64)),
            LabelUse::Partial { classes } => {
                (r % 2 == 0).then(|| rng.random_range(0..classes as i64))
            }
        })
        .collect();
    Batch {
        x,
        dim,
        labels,
        ids: (0..rows as u64).collect(),
        global_rows: rows as u64,
        cursor_after: Cursor::start(0),
    }
}

/// The largest |a − b| relative to the larger magnitude of the two tensors.
fn relative_gap(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = a
        .iter()
        .chain(&b)
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-6);
    let gap = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    gap / scale
}

#[test]
fn every_model_kind_computes_the_cpu_loss_and_gradients() {
    let gpu = gpu();
    for (file, set) in CASES {
        let case = format!("{file} {set:?}");
        let cpu_model = model(file, set, &Device::Cpu);
        let gpu_model = model(file, set, &gpu);
        let b = batch(64, cpu_model.labels(), 1);
        let noise = Noise::new(7);
        let mut outputs = Vec::new();
        for (m, device) in [(&cpu_model, &Device::Cpu), (&gpu_model, &gpu)] {
            let x = Tensor::from_slice(&b.x, (b.rows(), b.dim), device).unwrap();
            let input = Input {
                x: &x,
                labels: &b.labels,
                ids: &b.ids,
            };
            let ctx = StepContext {
                step: 3,
                noise: &noise,
                global_rows: b.global_rows,
                batch_stats: &[],
            };
            let batch_stats = whole_batch_statistics(m.as_ref(), &input, &ctx).unwrap();
            let ctx = StepContext {
                batch_stats: &batch_stats,
                ..ctx
            };
            let out = m.loss(&input, &ctx).unwrap();
            let grads = out.loss.backward().unwrap();
            let named: Vec<(String, Tensor)> = m
                .params()
                .vars()
                .iter()
                .map(|(name, var)| {
                    let g = grads
                        .get(var.as_tensor())
                        .cloned()
                        .unwrap_or_else(|| var.zeros_like().unwrap());
                    (name.clone(), g)
                })
                .collect();
            let loss = out.loss.to_scalar::<f32>().unwrap();
            outputs.push((loss, named));
        }
        let (cpu_loss, cpu_grads) = &outputs[0];
        let (gpu_loss, gpu_grads) = &outputs[1];
        assert!(
            (cpu_loss - gpu_loss).abs() <= 1e-4 * (1.0 + cpu_loss.abs()),
            "{case}: loss cpu {cpu_loss} vs gpu {gpu_loss}"
        );
        for ((name, c), (_, g)) in cpu_grads.iter().zip(gpu_grads) {
            let gap = relative_gap(c, g);
            assert!(
                gap <= 1e-3,
                "{case}: gradient of {name} differs by {gap:e} (relative)"
            );
        }
        println!("{case}: loss {cpu_loss} (cpu) {gpu_loss} (gpu)");
    }
}

#[test]
fn twenty_steps_on_the_gpu_track_the_cpu() {
    let gpu = gpu();
    for (file, set) in CASES {
        let case = format!("{file} {set:?}");
        let cfg = config(file, set);
        let mut trainers: Vec<Trainer> = [Device::Cpu, gpu.clone()]
            .iter()
            .map(|d| Trainer::new(model(file, set, d), step_config(&cfg, 20)).unwrap())
            .collect();
        let labels = trainers[0].model().labels();
        for step in 0..20 {
            let b = batch(64, labels, step);
            let cpu = trainers[0]
                .train_step(&b, &mut LocalReduce, &Device::Cpu)
                .unwrap();
            let on_gpu = trainers[1].train_step(&b, &mut LocalReduce, &gpu).unwrap();
            let (c, g) = (cpu.terms["loss"], on_gpu.terms["loss"]);
            assert!(
                (c - g).abs() <= 2e-3 * (1.0 + c.abs()),
                "{case}, step {step}: loss cpu {c} vs gpu {g}"
            );
        }
        let c = trainers[0].params().unwrap();
        let g = trainers[1].params().unwrap();
        let gap = c
            .iter()
            .zip(&g)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs() / (1.0 + a.abs())));
        assert!(
            gap <= 1e-2,
            "{case}: parameters after 20 steps differ by {gap:e}"
        );
        println!("{case}: 20 steps, parameters within {gap:e}");
    }
}

#[test]
fn the_gpu_evaluates_and_samples() {
    let gpu = gpu();
    for (file, set) in CASES {
        let m = model(file, set, &gpu);
        let classes = match m.labels() {
            LabelUse::Ignored => None,
            LabelUse::Every { .. } | LabelUse::Partial { .. } => Some(vec![0i64, 1, 2, 3]),
        };
        let drawn = m.sample(4, 0, classes.as_deref(), &gpu).unwrap();
        assert_eq!(drawn.dims()[0], 4, "{file} {set:?}");
    }
}
