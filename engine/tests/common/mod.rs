//! What the tests that compute one model two ways share (the GPU against the CPU in `gpu.rs`,
//! the composed forms against the fused kernels in `composed.rs`): every model kind as its
//! example config builds it, a fixed batch, a model's loss and gradients on it, and the gaps
//! between two results.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use elbo_datasets::{Batch, Cursor, DataSchema, PixelType};
use elbo_engine::Engine;
use elbo_models::{whole_batch_statistics, Input, LabelUse, Model, Noise, Registry, StepContext};
use elbo_settings::Layers;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every model kind, MLP and convolutional, as its example config builds it (with the `--set`
/// overrides listed). The code prior and M1+M2 build on a trained run, so they are not here;
/// their layers are (the masked convolution and the gate in `models/tests`, M2 here).
pub const CASES: &[(&str, &[&str])] = &[
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
    ("vqvae-mnist.toml", &[]),
    (
        "vqvae-mnist.toml",
        &[
            "model.vqvae.codebook=loss",
            "model.vqvae.restart_threshold=0",
        ],
    ),
    ("vqvae-mnist.toml", &["model.vqvae.init=kmeans"]),
    ("vqvae2-mnist.toml", &[]),
];

/// The input shape of every case.
const SHAPE: [usize; 3] = [1, 28, 28];

fn engine() -> Engine {
    let cache = std::env::temp_dir().join("elbo-engine-test-cache");
    Engine::new(Registry::builtin(), cache)
}

/// The example config `file` with the overrides `set`.
pub fn config(file: &str, set: &[&str]) -> elbo_settings::Config {
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

/// The model of `file` with `set`, on `device`: the same parameters on every device.
pub fn model(file: &str, set: &[&str], device: &Device) -> Box<dyn Model> {
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
pub fn batch(rows: usize, labels: LabelUse, seed: u64) -> Batch {
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

/// `m`'s loss on `b` (step 3, noise seed 7, the batch's own statistics when it takes rounds of
/// them) and the gradient of every parameter, by name (zeros where the loss does not reach it).
pub fn loss_and_gradients(
    m: &dyn Model,
    b: &Batch,
    device: &Device,
) -> (f32, Vec<(String, Tensor)>) {
    let x = Tensor::from_slice(&b.x, (b.rows(), b.dim), device).unwrap();
    let input = Input {
        x: &x,
        labels: &b.labels,
        ids: &b.ids,
    };
    let noise = Noise::new(7);
    let ctx = StepContext {
        step: 3,
        noise: &noise,
        global_rows: b.global_rows,
        batch_stats: &[],
    };
    let batch_stats = whole_batch_statistics(m, &input, &ctx).unwrap();
    let ctx = StepContext {
        batch_stats: &batch_stats,
        ..ctx
    };
    let out = m.loss(&input, &ctx).unwrap();
    let grads = out.loss.backward().unwrap();
    let named = m
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
    (out.loss.to_scalar::<f32>().unwrap(), named)
}

/// The largest |a − b| relative to the larger magnitude of the two tensors.
pub fn relative_gap(a: &Tensor, b: &Tensor) -> f32 {
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

/// How far two runs that started from `initial` drifted apart, against how far training moved
/// them: ‖a − b‖ / ‖a − initial‖. A measure of the whole vector: Adam moves a parameter whose
/// gradient is all rounding by its full step either way, so entries alone say little.
pub fn drift(initial: &[f32], a: &[f32], b: &[f32]) -> f64 {
    assert!(initial.len() == a.len() && a.len() == b.len());
    let norm = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    norm(a, b) / norm(a, initial).max(f64::MIN_POSITIVE)
}

/// Asserts that two [`loss_and_gradients`] agree: the losses within `loss_tolerance`·(1 + |loss|)
/// and every gradient within `gradient_tolerance` relative to its magnitude.
pub fn assert_agree(
    case: &str,
    (want_loss, want): &(f32, Vec<(String, Tensor)>),
    (got_loss, got): &(f32, Vec<(String, Tensor)>),
    loss_tolerance: f32,
    gradient_tolerance: f32,
) {
    assert!(
        (want_loss - got_loss).abs() <= loss_tolerance * (1.0 + want_loss.abs()),
        "{case}: loss {want_loss} vs {got_loss}"
    );
    assert_eq!(want.len(), got.len(), "{case}: parameters");
    for ((name, w), (other, g)) in want.iter().zip(got) {
        assert_eq!(name, other, "{case}: parameters");
        let gap = relative_gap(w, g);
        assert!(
            gap <= gradient_tolerance,
            "{case}: gradient of {name} differs by {gap:e} (relative)"
        );
    }
}
