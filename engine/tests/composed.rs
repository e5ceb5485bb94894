//! What a GPU runs, run on the CPU. Off the CPU every op with a fused CPU kernel takes its
//! composed form (candle's ops), and the trainer keeps its step on the device; on the CPU,
//! `ComposedForms` and `Trainer::keep_on_device` take those same code paths. So for every model
//! kind these tests check, without a GPU: the composed forms compute the fused kernels' loss
//! and gradients, and training with the GPU's whole step tracks the CPU's step. On a GPU,
//! `gpu.rs` checks the same cases with CUDA's kernels beneath.

mod common;

use candle_core::Device;
use common::{assert_agree, batch, config, drift, loss_and_gradients, model, CASES};
use elbo_engine::step_config;
use elbo_models::ComposedForms;
use elbo_worker::{LocalReduce, Trainer};

/// Rows per batch and training steps of the tracking test.
const ROWS: usize = 32;
const STEPS: u64 = 10;

#[test]
fn every_model_kind_computes_the_fused_loss_and_gradients_in_its_composed_forms() {
    let cpu = Device::Cpu;
    for (file, set) in CASES {
        let case = format!("{file} {set:?}");
        let fused_model = model(file, set, &cpu);
        let composed_model = model(file, set, &cpu);
        let b = batch(64, fused_model.labels(), 1);
        let fused = loss_and_gradients(fused_model.as_ref(), &b, &cpu);
        let composed = {
            let _forms = ComposedForms::on();
            loss_and_gradients(composed_model.as_ref(), &b, &cpu)
        };
        assert_agree(&case, &fused, &composed, 1e-5, 1e-3);
    }
}

#[test]
fn training_with_the_gpus_step_tracks_the_cpus_step() {
    let cpu = Device::Cpu;
    for (file, set) in CASES {
        let case = format!("{file} {set:?}");
        let cfg = config(file, set);
        let mut fused = Trainer::new(model(file, set, &cpu), step_config(&cfg, STEPS)).unwrap();
        let mut composed = Trainer::new(model(file, set, &cpu), step_config(&cfg, STEPS))
            .and_then(Trainer::keep_on_device)
            .unwrap();
        let initial = fused.params().unwrap();
        let labels = fused.model().labels();
        for step in 0..STEPS {
            let b = batch(ROWS, labels, step);
            let want = fused.train_step(&b, &mut LocalReduce, &cpu).unwrap();
            let got = {
                let _forms = ComposedForms::on();
                composed.train_step(&b, &mut LocalReduce, &cpu).unwrap()
            };
            let (w, g) = (want.terms["loss"], got.terms["loss"]);
            assert!(
                (w - g).abs() <= 5e-4 * (1.0 + w.abs()),
                "{case}, step {step}: loss {w} (fused, host step) vs {g} (composed, device step)"
            );
        }
        let drift = drift(
            &initial,
            &fused.params().unwrap(),
            &composed.params().unwrap(),
        );
        assert!(
            drift <= 2e-2,
            "{case}: after {STEPS} steps the runs are {drift:e} of the distance trained apart"
        );
    }
}
