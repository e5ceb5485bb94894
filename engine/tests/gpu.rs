//! On a GPU: every model kind computes the CPU's loss and gradients, and training on the GPU
//! tracks training on the CPU. Compiled only in a CUDA build (`--features cuda`) and run on a
//! machine with a GPU by `scripts/gpu_check.sh`; there, no GPU is a failure, not a skip.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{assert_agree, batch, config, drift, loss_and_gradients, model, CASES};
use elbo_engine::step_config;
use elbo_models::LabelUse;
use elbo_worker::{LocalReduce, Trainer};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device 0 (this test runs on a machine with a GPU)")
}

#[test]
fn every_model_kind_computes_the_cpu_loss_and_gradients() {
    let gpu = gpu();
    for (file, set) in CASES {
        let case = format!("{file} {set:?}");
        let cpu_model = model(file, set, &Device::Cpu);
        let gpu_model = model(file, set, &gpu);
        let b = batch(64, cpu_model.labels(), 1);
        let on_cpu = loss_and_gradients(cpu_model.as_ref(), &b, &Device::Cpu);
        let on_gpu = loss_and_gradients(gpu_model.as_ref(), &b, &gpu);
        assert_agree(&case, &on_cpu, &on_gpu, 1e-4, 1e-3);
        println!("{case}: loss {} (cpu) {} (gpu)", on_cpu.0, on_gpu.0);
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
        let initial = trainers[0].params().unwrap();
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
        let drift = drift(
            &initial,
            &trainers[0].params().unwrap(),
            &trainers[1].params().unwrap(),
        );
        assert!(
            drift <= 5e-2,
            "{case}: after 20 steps the runs are {drift:e} of the distance trained apart"
        );
        println!("{case}: 20 steps, the runs {drift:e} of the distance trained apart");
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
