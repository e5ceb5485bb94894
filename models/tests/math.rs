//! The math against closed forms, hand-computed values and finite differences.

mod common;

use candle_core::{DType, Device, Tensor, D};
use std::collections::BTreeMap;

use elbo_models::{
    bernoulli_nll, gaussian_kl, iw_bound, whole_batch_statistics, Activation, Architecture,
    EvalOptions, Input, Likelihood, LikelihoodKind, LossOutput, M2Config, Metric, Model, ModelSpec,
    Noise, Objective, Params, Purpose, StepContext, Term, Vae, M2,
};
use elbo_models::{reparameterise, LatentModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn spec(likelihood: LikelihoodKind, activation: Activation) -> ModelSpec {
    ModelSpec {
        input_shape: vec![6],
        latent_dim: 3,
        architecture: Architecture::Mlp,
        hidden: vec![5],
        activation,
        likelihood,
        variance: 0.5,
        log_var_clamp: 8.0,
        objective: Objective::default(),
    }
}

/// The loss of a whole batch in one process: the batch statistics (free bits) computed on it
/// first, as the trainer does with their all-reduced sums.
fn loss(model: &dyn Model, input: &Input<'_>, noise: &Noise, step: u64) -> LossOutput {
    let mut ctx = StepContext {
        step,
        noise,
        global_rows: input.ids.len() as u64,
        batch_stats: &[],
    };
    let stats = whole_batch_statistics(model, input, &ctx).unwrap();
    ctx.batch_stats = &stats;
    model.loss(input, &ctx).unwrap()
}

/// A term's mean.
fn mean(term: &Term) -> f64 {
    term.sum.to_scalar::<f32>().unwrap() as f64 / term.count
}

fn data(rows: usize, dim: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * dim).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, (rows, dim), &Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn kl_matches_monte_carlo() {
    let mu = Tensor::new(&[[0.3f32, -1.2, 2.0]], &Device::Cpu).unwrap();
    let lv = Tensor::new(&[[0.5f32, -2.0, 1.0]], &Device::Cpu).unwrap();
    let closed: Vec<f32> = gaussian_kl(&mu, &lv)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let noise = Noise::new(1);
    let n = 200_000;
    let ids: Vec<u64> = (0..n as u64).collect();
    let eps = noise
        .rows(Purpose::Sample, 0, &ids, 3, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (m, l) = (
        mu.squeeze(0).unwrap().to_vec1::<f32>().unwrap(),
        lv.squeeze(0).unwrap().to_vec1::<f32>().unwrap(),
    );
    for j in 0..3 {
        let sd = (0.5 * l[j]).exp() as f64;
        // KL = E_q[log q(z) − log p(z)] = E[−½ε² − log σ + ½z²]
        let mc: f64 = eps
            .iter()
            .map(|e| {
                let e = e[j] as f64;
                let z = m[j] as f64 + sd * e;
                -0.5 * e * e - sd.ln() + 0.5 * z * z
            })
            .sum::<f64>()
            / n as f64;
        assert!(
            (mc - closed[j] as f64).abs() < 0.02 * (1.0 + closed[j] as f64),
            "dim {j}: MC {mc} vs closed {}",
            closed[j]
        );
    }
}

#[test]
fn bernoulli_nll_matches_hand_computed_and_is_finite_at_100() {
    let logits = Tensor::new(&[[0.0f32, 2.0, -3.0, 100.0, -100.0, 100.0]], &Device::Cpu).unwrap();
    let x = Tensor::new(&[[1.0f32, 0.0, 1.0, 1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
    let got = bernoulli_nll(&logits, &x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let sig = |l: f64| 1.0 / (1.0 + (-l).exp());
    // −log σ(0) − log(1−σ(2)) − log σ(−3) − log σ(100) − log(1 − σ(−100)) − log(1 − σ(100))
    let want = -(sig(0.0).ln() + (1.0 - sig(2.0)).ln() + sig(-3.0).ln()) + 0.0 + 0.0 + 100.0;
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    let x_soft = Tensor::new(&[[0.25f32, 0.5, 0.75, 1.0, 0.0, 0.5]], &Device::Cpu).unwrap();
    let got = bernoulli_nll(&logits, &x_soft)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(got.is_finite());
}

/// The vectorized kernels on batches small (one thread) and large (split by rows), rows whose
/// length is and is not a multiple of the lanes: values and gradients against f64.
#[test]
fn bernoulli_nll_and_its_gradient_match_f64_on_small_and_large_batches() {
    let sig = |l: f64| 1.0 / (1.0 + (-l).exp());
    for (rows, dim) in [(3, 5), (7, 37), (300, 784), (2000, 33)] {
        let mut rng = ChaCha8Rng::seed_from_u64((rows * dim) as u64);
        let l: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(-30.0..30.0))
            .collect();
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let w: Vec<f32> = (0..rows).map(|_| rng.random_range(-2.0..2.0)).collect();
        let logits = candle_core::Var::from_vec(l.clone(), (rows, dim), &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(x.clone(), (rows, dim), &Device::Cpu).unwrap();
        let weights = Tensor::from_vec(w.clone(), rows, &Device::Cpu).unwrap();
        let nll = bernoulli_nll(logits.as_tensor(), &targets).unwrap();
        let grads = (&nll * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = nll.to_vec1::<f32>().unwrap();
        let grad = grads.get(&logits).unwrap().flatten_all().unwrap();
        let grad = grad.to_vec1::<f32>().unwrap();
        for r in 0..rows {
            let row = r * dim..(r + 1) * dim;
            let want: f64 = row
                .clone()
                .map(|i| {
                    let (l, x) = (f64::from(l[i]), f64::from(x[i]));
                    l.max(0.0) - x * l + (1.0 + (-l.abs()).exp()).ln()
                })
                .sum();
            let got = f64::from(got[r]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{rows}×{dim} row {r}: {got} vs {want}"
            );
            for i in row {
                let want = f64::from(w[r]) * (sig(f64::from(l[i])) - f64::from(x[i]));
                let got = f64::from(grad[i]);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{rows}×{dim} [{i}]: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gaussian_nll_matches_hand_computed() {
    let mut params = Params::new(&Device::Cpu, 0);
    let mean = Tensor::new(&[[0.0f32, 1.0], [2.0, -1.0]], &Device::Cpu).unwrap();
    let x = Tensor::new(&[[0.5f32, 1.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let ln2pi = (2.0 * std::f64::consts::PI).ln();
    let want = |var: f64| -> Vec<f64> {
        [[0.25, 0.0], [4.0, 1.0]]
            .iter()
            .map(|r: &[f64; 2]| r.iter().map(|sq| 0.5 * (sq / var + var.ln() + ln2pi)).sum())
            .collect()
    };
    let fixed = Likelihood::new(&mut params, LikelihoodKind::GaussianFixed, 2, 0.5).unwrap();
    let got: Vec<f32> = fixed.nll(&mean, &x).unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(want(0.5)) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
    let learned = Likelihood::new(&mut params, LikelihoodKind::GaussianPerDim, 2, 1.0).unwrap();
    let got: Vec<f32> = learned.nll(&mean, &x).unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(want(1.0)) {
        assert!(
            (*g as f64 - w).abs() < 1e-5,
            "learned variance starts at 1: {g} vs {w}"
        );
    }
}

/// Central finite differences of the whole loss against autograd, for a sample of parameters.
fn check_gradients(likelihood: LikelihoodKind, objective: Objective) {
    check_gradients_of(likelihood, objective, 0);
}

/// The same for a VAE conditioned on a label of `classes` classes (0: unconditional).
fn check_gradients_of(likelihood: LikelihoodKind, objective: Objective, classes: usize) {
    let spec = ModelSpec {
        objective,
        ..spec(likelihood, Activation::Tanh)
    };
    let vae = Vae::conditional(spec, classes, &Device::Cpu, 3).unwrap();
    let x = data(4, 6, 9);
    let ids = [10u64, 11, 12, 13];
    let labels: Vec<Option<i64>> = (0..4)
        .map(|i| (classes > 0).then_some(i % classes.max(1) as i64))
        .collect();
    check_model_gradients(&vae, &x, &ids, &labels);
}

/// Central finite differences of a model's loss on a batch against autograd.
fn check_model_gradients(model: &dyn Model, x: &Tensor, ids: &[u64], labels: &[Option<i64>]) {
    let input = Input { x, labels, ids };
    let noise = Noise::new(5);
    let loss_of = || loss(model, &input, &noise, 7).loss;
    let checked = common::check_gradients(model.params(), loss_of, |_| true, 3, (5e-3, 2e-2));
    assert!(checked >= 24);
}

#[test]
fn gradients_match_finite_differences_bernoulli() {
    check_gradients(LikelihoodKind::Bernoulli, Objective::default());
}

#[test]
fn gradients_of_the_conditional_vae_match_finite_differences() {
    check_gradients_of(LikelihoodKind::Bernoulli, Objective::default(), 3);
}

#[test]
fn a_conditional_vae_reads_every_rows_label_and_refuses_bad_ones() {
    let vae = Vae::conditional(
        spec(LikelihoodKind::Bernoulli, Activation::Relu),
        3,
        &Device::Cpu,
        2,
    )
    .unwrap();
    let x = data(2, 6, 5);
    let ids = [7u64, 8];
    let noise = Noise::new(1);
    let loss_with = |labels: &[Option<i64>]| {
        let input = Input {
            x: &x,
            labels,
            ids: &ids,
        };
        let ctx = StepContext {
            step: 0,
            noise: &noise,
            global_rows: 2,
            batch_stats: &[],
        };
        vae.loss(&input, &ctx)
            .map(|out| out.loss.to_scalar::<f32>().unwrap())
            .map_err(|e| e.to_string())
    };
    let a = loss_with(&[Some(0), Some(1)]).unwrap();
    let b = loss_with(&[Some(2), Some(1)]).unwrap();
    assert!(
        (a - b).abs() > 1e-4,
        "the label changes the bound: {a} vs {b}"
    );
    let missing = loss_with(&[Some(0), None]).unwrap_err();
    assert!(missing.contains("row 8 has no label"), "{missing}");
    let outside = loss_with(&[Some(3), Some(0)]).unwrap_err();
    assert!(
        outside.contains("row 7 has label 3, but the model has 3 classes"),
        "{outside}"
    );
    assert_eq!(vae.labels(), elbo_models::LabelUse::Every { classes: 3 });
    let drawn = vae.sample(4, 0, Some(&[0, 0, 2, 2]), &Device::Cpu).unwrap();
    assert_eq!(drawn.dims(), [4, 6]);
    let rows = drawn.to_vec2::<f32>().unwrap();
    assert!(
        rows[0] != rows[2],
        "the same noise decodes differently under another label"
    );
    assert!(
        vae.sample(4, 0, None, &Device::Cpu).is_err(),
        "a conditional VAE samples given labels"
    );
}

#[test]
fn the_conditional_iw_bound_is_above_the_elbo_and_grows_with_k() {
    let sharp = ModelSpec {
        variance: 0.02,
        ..spec(LikelihoodKind::GaussianFixed, Activation::Relu)
    };
    let vae = Vae::conditional(sharp, 4, &Device::Cpu, 4).unwrap();
    let x = data(128, 6, 3);
    let ids: Vec<u64> = (0..128).collect();
    let labels: Vec<Option<i64>> = (0..128).map(|i| Some(i % 4)).collect();
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let noise = Noise::new(2);
    let bound = |k: usize| {
        let b = iw_bound(128, k, 1 << 20, |s| vae.log_weights(&input, &noise, s)).unwrap();
        b.iter().sum::<f64>() / b.len() as f64
    };
    let elbo = -(0..50u64)
        .map(|s| mean(&loss(&vae, &input, &noise, s).terms["neg_elbo"]))
        .sum::<f64>()
        / 50.0;
    let (one, many) = (bound(1), bound(100));
    assert!(
        (one - elbo).abs() < 0.02 * elbo.abs(),
        "k = 1 estimates the conditional ELBO: {one} vs {elbo}"
    );
    assert!(many > one, "k = 100 is tighter: {many} vs {one}");
}

#[test]
fn gradients_match_finite_differences_gaussian_beta_free_bits() {
    check_gradients(
        LikelihoodKind::GaussianPerDim,
        Objective {
            beta: 4.0,
            warmup_steps: 0,
            free_bits: 0.05,
        },
    );
    check_gradients(
        LikelihoodKind::GaussianGlobal,
        Objective {
            beta: 0.5,
            warmup_steps: 100,
            free_bits: 0.0,
        },
    );
}

#[test]
fn objective_terms_and_warmup() {
    let vae = |objective| {
        let spec = ModelSpec {
            objective,
            ..spec(LikelihoodKind::Bernoulli, Activation::Relu)
        };
        Vae::new(spec, &Device::Cpu, 1).unwrap()
    };
    let x = data(8, 6, 2);
    let ids: Vec<u64> = (0..8).collect();
    let input = Input {
        x: &x,
        labels: &[None; 8],
        ids: &ids,
    };
    let noise = Noise::new(0);
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
    let warm = Objective {
        beta: 2.0,
        warmup_steps: 10,
        free_bits: 0.0,
    };
    let out = loss(&vae(warm), &input, &noise, 4);
    let (rec, kl) = (mean(&out.terms["rec"]), mean(&out.terms["kl"]));
    assert!((mean(&out.terms["neg_elbo"]) - (rec + kl)).abs() < 1e-4);
    assert!(
        (mean(&out.terms["kl_weight"]) - 1.0).abs() < 1e-6,
        "step 4 of 10: weight 2 × 5/10"
    );
    assert!((scalar(&out.loss) - (rec + kl)).abs() < 1e-4);
    assert!((mean(&out.terms["loss"]) - scalar(&out.loss)).abs() < 1e-4);
    assert_eq!(warm.kl_weight(50), 2.0);
    // Free bits: with a floor far above the KL, the penalised KL is d × floor.
    let fb = Objective {
        beta: 1.0,
        warmup_steps: 0,
        free_bits: 100.0,
    };
    let out = loss(&vae(fb), &input, &noise, 4);
    assert!((scalar(&out.loss) - (mean(&out.terms["rec"]) + 300.0)).abs() < 1e-3);
    assert!((mean(&out.terms["loss"]) - scalar(&out.loss)).abs() < 1e-3);
}

/// Free bits clamp the *global* batch's mean KL per dimension: the loss of a batch split in
/// two parts, each given the whole batch's statistics, adds up to the loss of the whole batch,
/// and so do the gradients.
#[test]
fn free_bits_split_across_ranks_add_up_to_the_whole_batch() {
    let spec = ModelSpec {
        objective: Objective {
            beta: 1.0,
            warmup_steps: 0,
            free_bits: 0.02,
        },
        ..spec(LikelihoodKind::Bernoulli, Activation::Tanh)
    };
    let vae = Vae::new(spec, &Device::Cpu, 6).unwrap();
    let x = data(9, 6, 8);
    let ids: Vec<u64> = (0..9).collect();
    let labels = [None; 9];
    let noise = Noise::new(3);
    let (xa, xb) = (x.narrow(0, 0, 4).unwrap(), x.narrow(0, 4, 5).unwrap());
    let whole = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let first = Input {
        x: &xa,
        labels: &labels[..4],
        ids: &ids[..4],
    };
    let second = Input {
        x: &xb,
        labels: &labels[4..],
        ids: &ids[4..],
    };
    let stats: Vec<f32> = vae
        .batch_statistics(
            &whole,
            &StepContext {
                step: 0,
                noise: &noise,
                global_rows: 9,
                batch_stats: &[],
            },
            0,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    let mean_kl: Vec<f32> = stats.iter().map(|s| s / 9.0).collect();
    assert!(
        mean_kl.iter().any(|k| *k > 0.02) && mean_kl.iter().any(|k| *k < 0.02),
        "the floor binds some dimensions and not others: {mean_kl:?}"
    );
    let ctx = StepContext {
        step: 0,
        noise: &noise,
        global_rows: 9,
        batch_stats: &stats,
    };
    let gradient = |input: &Input<'_>| {
        let out = vae.loss(input, &ctx).unwrap();
        let grads = out.loss.backward().unwrap();
        let flat: Vec<f32> = vae
            .params()
            .vars()
            .values()
            .flat_map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (out.loss.to_scalar::<f32>().unwrap(), flat)
    };
    let (all, g_all) = gradient(&whole);
    let (a, g_a) = gradient(&first);
    let (b, g_b) = gradient(&second);
    assert!((a + b - all).abs() < 1e-4 * all.abs(), "{a} + {b} vs {all}");
    for ((x, y), z) in g_a.iter().zip(&g_b).zip(&g_all) {
        assert!(
            (x + y - z).abs() <= 1e-5 * (1.0 + z.abs()),
            "{x} + {y} vs {z}"
        );
    }
}

#[test]
fn iwae_bound_is_above_the_elbo_and_grows_with_k() {
    // A sharp likelihood makes the importance weights informative, so the bound keeps growing.
    let sharp = ModelSpec {
        variance: 0.02,
        ..spec(LikelihoodKind::GaussianFixed, Activation::Relu)
    };
    let vae = Vae::new(sharp, &Device::Cpu, 4).unwrap();
    let x = data(256, 6, 3);
    let ids: Vec<u64> = (0..256).collect();
    let input = Input {
        x: &x,
        labels: &[None; 256],
        ids: &ids,
    };
    let noise = Noise::new(2);
    let average = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let bound = |vae: &Vae, input: &Input<'_>, noise: &Noise, k: usize, max_rows: usize| {
        iw_bound(input.ids.len(), k, max_rows, |samples| {
            vae.log_weights(input, noise, samples)
        })
        .unwrap()
    };
    let bounds: Vec<f64> = [1, 10, 100]
        .iter()
        .map(|k| average(bound(&vae, &input, &noise, *k, 1 << 20)))
        .collect();
    // The analytic-KL ELBO, averaged over many single-sample reconstructions.
    let elbo = -(0..50u64)
        .map(|s| mean(&loss(&vae, &input, &noise, s).terms["neg_elbo"]))
        .sum::<f64>()
        / 50.0;
    assert!(
        (bounds[0] - elbo).abs() < 0.02 * elbo.abs(),
        "k = 1 estimates the ELBO: {} vs {elbo}",
        bounds[0]
    );
    assert!(
        bounds[1] > bounds[0] && bounds[2] > bounds[1],
        "non-decreasing in k: {bounds:?}"
    );
    // Grouping the samples to bound memory changes nothing.
    let small = bound(&vae, &input, &noise, 100, 256 * 7);
    assert!((average(small) - bounds[2]).abs() < 1e-9);
}

#[test]
fn conv_vaes_take_28_32_and_64_pixel_images() {
    for side in [28usize, 32, 64] {
        let spec = ModelSpec {
            input_shape: vec![1, side, side],
            architecture: Architecture::Conv,
            hidden: vec![32],
            ..spec(LikelihoodKind::Bernoulli, Activation::Relu)
        };
        let vae = Vae::new(spec, &Device::Cpu, 0).unwrap();
        let x = data(2, side * side, 1);
        let ids = [0u64, 1];
        let input = Input {
            x: &x,
            labels: &[None; 2],
            ids: &ids,
        };
        let out = loss(&vae, &input, &Noise::new(0), 0);
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
        let z = Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.decode_mean(&z, None).unwrap().dims(), [3, side * side]);
        let grads = out.loss.backward().unwrap();
        assert!(
            vae.params()
                .vars()
                .values()
                .all(|v| grads.get(v.as_tensor()).is_some()),
            "every parameter gets a gradient"
        );
    }
    let bad = ModelSpec {
        input_shape: vec![1, 30, 30],
        architecture: Architecture::Conv,
        ..spec(LikelihoodKind::Bernoulli, Activation::Relu)
    };
    assert!(Vae::new(bad, &Device::Cpu, 0).is_err());
}

#[test]
fn noise_depends_on_the_row_id_not_the_batch() {
    let noise = Noise::new(3);
    let a = noise
        .rows(Purpose::Train, 5, &[1, 2, 3], 4, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = noise
        .rows(Purpose::Train, 5, &[3, 1], 4, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a[0], b[1]);
    assert_eq!(a[2], b[0]);
    let c = noise
        .rows(Purpose::Train, 6, &[1], 4, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(a[0], c[0], "a new step draws new noise");
    let all = noise
        .rows(
            Purpose::Eval,
            0,
            &(0..5000).collect::<Vec<_>>(),
            2,
            &Device::Cpu,
        )
        .unwrap();
    let var = all
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((var - 1.0).abs() < 0.05, "standard normal: E[ε²] = {var}");
    let _ = all.sum(D::Minus1);
}

#[test]
fn fused_dense_matches_the_unfused_chain_with_its_gradients() {
    use candle_core::Var;
    let rand = |shape: &[usize], seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            (0..n)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    for relu in [false, true] {
        let x = Var::from_tensor(&rand(&[7, 13], 1)).unwrap();
        let w = Var::from_tensor(&rand(&[5, 13], 2)).unwrap();
        let b = Var::from_tensor(&rand(&[5], 3)).unwrap();
        let up = rand(&[7, 5], 4); // a fixed upstream gradient: loss = Σ y ⊙ up
        let fused = elbo_models::dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), relu).unwrap();
        let chain = x
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let chain = if relu { chain.relu().unwrap() } else { chain };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_difference(a, b);
            assert!(d < 1e-5, "{what} (relu {relu}): max difference {d}");
        };
        close(&fused, &chain, "forward");
        let gf = (&fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&chain * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [(&x, "dx"), (&w, "dW"), (&b, "db")] {
            close(
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
                name,
            );
        }
    }
    // Data (a tensor that tracks nothing) gets no gradient computed.
    let x = rand(&[3, 4], 5);
    let w = Var::from_tensor(&rand(&[2, 4], 6)).unwrap();
    let b = Var::from_tensor(&rand(&[2], 7)).unwrap();
    let g = elbo_models::dense(&x, w.as_tensor(), b.as_tensor(), true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_none() && g.get(w.as_tensor()).is_some());
}

/// A conditional MLP's class embedding is the one-hot code appended to the input: the same
/// outputs and gradients as the joined layer `[W | Eᵀ]` on `[x[rows], onehot(y)]`, with rows of
/// `x` read several times.
#[test]
fn a_class_embedding_equals_a_one_hot_code_beside_the_input() {
    for activation in [Activation::Relu, Activation::Tanh] {
        for shared in [true, false] {
            class_embedding_case(activation, shared);
        }
    }
}

/// `shared`: 2 rows of x read by 5 outputs; otherwise 5 rows, one each.
fn class_embedding_case(activation: Activation, shared: bool) {
    let mut params = Params::new(&Device::Cpu, 3);
    let mlp = elbo_models::Mlp::conditional(&mut params, "net", &[5, 4, 3], 3, activation).unwrap();
    let var = |name: &str| params.vars()[name].as_tensor().clone();
    let (x, rows) = if shared {
        (data(2, 5, 9), [0u32, 1, 1, 0, 1])
    } else {
        (data(5, 5, 9), [0u32, 1, 2, 3, 4])
    };
    let rows = Tensor::new(&rows, &Device::Cpu).unwrap();
    let classes = Tensor::new(&[2u32, 0, 1, 1, 2], &Device::Cpu).unwrap();
    let up = data(5, 3, 10); // a fixed upstream gradient: loss = Σ out ⊙ up
    let out = mlp
        .forward_rows(&x, shared.then_some(&rows), Some(&classes), false)
        .unwrap();

    let (w0, e, b0) = (
        var("net.0.weight"),
        var("net.0.class_embedding"),
        var("net.0.bias"),
    );
    let (w1, b1) = (var("net.1.weight"), var("net.1.bias"));
    let joined_w = Tensor::cat(&[&w0, &e.t().unwrap()], 1).unwrap();
    let one_hot = Tensor::new(
        &[
            [0f32, 0., 1.],
            [1., 0., 0.],
            [0., 1., 0.],
            [0., 1., 0.],
            [0., 0., 1.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let joined_x = Tensor::cat(&[&x.index_select(&rows, 0).unwrap(), &one_hot], 1).unwrap();
    let h = joined_x
        .matmul(&joined_w.t().unwrap())
        .unwrap()
        .broadcast_add(&b0)
        .unwrap();
    let h = activation.apply(&h).unwrap();
    let want = h
        .matmul(&w1.t().unwrap())
        .unwrap()
        .broadcast_add(&b1)
        .unwrap();
    let grads = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let (g_out, g_want) = (grads(&out), grads(&want));
    assert!(
        max_difference(&out, &want) < 1e-6,
        "{activation:?}: outputs differ"
    );
    for name in [
        "net.0.weight",
        "net.0.class_embedding",
        "net.0.bias",
        "net.1.weight",
    ] {
        let v = var(name);
        let d = max_difference(g_out.get(&v).unwrap(), g_want.get(&v).unwrap());
        assert!(
            d < 1e-5,
            "{activation:?}: gradient of {name} differs by {d}"
        );
    }
    // Classes are required by a conditional MLP and refused by an unconditional one.
    assert!(mlp.forward(&x, false).is_err());
    let plain = elbo_models::Mlp::new(&mut params, "plain", &[5, 3], Activation::Relu).unwrap();
    assert!(plain.forward_rows(&x, None, Some(&classes), false).is_err());
}

/// The last layer fused with the Bernoulli likelihood: the NLL and the gradients of x, W and
/// b equal those of the dense layer followed by the likelihood, on a first backward pass (which
/// reuses the kept logits) and a second one (which computes them again).
#[test]
fn dense_fused_with_the_bernoulli_nll_matches_the_chain() {
    use candle_core::Var;
    let x = Var::from_tensor(&data(300, 13, 21)).unwrap();
    let w = Var::from_tensor(&(data(37, 13, 22) * 3.0).unwrap()).unwrap();
    let b = Var::from_tensor(&data(1, 37, 23).flatten_all().unwrap()).unwrap();
    // The targets are a view starting inside its storage, as a rank's rows of a batch are.
    let target = data(302, 37, 24)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .narrow(0, 2, 300)
        .unwrap();
    let up = data(1, 300, 25).flatten_all().unwrap(); // loss = Σ nll ⊙ up
    let fused =
        elbo_models::dense_bernoulli_nll(x.as_tensor(), w.as_tensor(), b.as_tensor(), &target)
            .unwrap();
    let logits = elbo_models::dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), false).unwrap();
    let chain = bernoulli_nll(&logits, &target).unwrap();
    assert!(max_difference(&fused, &chain) < 1e-4, "values differ");
    let loss = |t: &Tensor| (t * &up).unwrap().sum_all().unwrap();
    let want = loss(&chain).backward().unwrap();
    for pass in ["first", "second"] {
        let got = loss(&fused).backward().unwrap();
        for (v, name) in [(&x, "dx"), (&w, "dW"), (&b, "db")] {
            let d = max_difference(
                got.get(v.as_tensor()).unwrap(),
                want.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{pass} backward pass: {name} differs by {d}");
        }
    }
}

#[test]
fn gradient_sink_receives_exactly_the_gradients_candle_would() {
    let vae = Vae::new(
        spec(LikelihoodKind::Bernoulli, Activation::Relu),
        &Device::Cpu,
        8,
    )
    .unwrap();
    let x = data(5, 6, 4);
    let ids = [1u64, 2, 3, 4, 5];
    let input = Input {
        x: &x,
        labels: &[None; 5],
        ids: &ids,
    };
    let noise = Noise::new(1);
    let plain = loss(&vae, &input, &noise, 0).loss.backward().unwrap();
    let sink = vae.params().grad_sink().clone();
    vae.params().enable_grad_sink();
    for _ in 0..2 {
        // Twice: the second step overwrites the first step's deposits rather than adding to them.
        sink.begin_step();
        let store = loss(&vae, &input, &noise, 0).loss.backward().unwrap();
        let mut deposited = 0;
        for (name, var) in vae.params().vars() {
            let want = plain
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            match sink.with_gradient(name, |g| g.to_vec()) {
                Some(got) => {
                    deposited += 1;
                    assert!(
                        store.get(var.as_tensor()).is_none(),
                        "{name}: not also handed to candle"
                    );
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                            "{name}: {a} vs {b}"
                        );
                    }
                }
                None => panic!("{name}: every parameter of an MLP VAE is in a dense layer"),
            }
        }
        assert_eq!(deposited, vae.params().vars().len());
    }
}

#[test]
fn absurd_layer_sizes_are_errors() {
    let huge = ModelSpec {
        hidden: vec![1 << 30],
        ..spec(LikelihoodKind::Bernoulli, Activation::Relu)
    };
    let err = Vae::new(huge, &Device::Cpu, 0)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("choose smaller layers"), "{err}");
}

fn m2(alpha: f64) -> M2 {
    let cfg = M2Config {
        classes: 3,
        alpha,
        classifier_hidden: vec![4],
        features_from: String::new(),
    };
    M2::new(
        &spec(LikelihoodKind::Bernoulli, Activation::Tanh),
        &cfg,
        None,
        &Device::Cpu,
        11,
    )
    .unwrap()
}

/// M1+M2: an M2 on a trained VAE's features (3 dims of 6-value examples) and the same M2 (same
/// seed, so the same parameters) built for 3-value examples.
fn m2_on_features(base: Vae) -> Result<(M2, M2), String> {
    let cfg = M2Config {
        classes: 3,
        alpha: 2.0,
        classifier_hidden: vec![4],
        features_from: "m1-run".into(),
    };
    let on_data = spec(LikelihoodKind::GaussianPerDim, Activation::Tanh);
    let on_features = ModelSpec {
        input_shape: vec![3],
        ..on_data.clone()
    };
    let m1m2 = M2::new(&on_data, &cfg, Some(Box::new(base)), &Device::Cpu, 11)
        .map_err(|e| e.to_string())?;
    let plain = M2::new(&on_features, &cfg, None, &Device::Cpu, 11).unwrap();
    Ok((m1m2, plain))
}

/// M1+M2 trains M2 on a sample of the VAE's q(z|x) per row, drawn from its own stream keyed by
/// step and row id: its loss is the plain M2's loss on those samples, the VAE gets no gradient,
/// and what it draws is decoded to data space by the VAE.
#[test]
fn m2_on_a_vae_s_features_is_m2_on_samples_of_its_posterior() {
    let base = Vae::new(
        spec(LikelihoodKind::Bernoulli, Activation::Relu),
        &Device::Cpu,
        5,
    )
    .unwrap();
    let base_vars: Vec<Tensor> = base
        .params()
        .vars()
        .values()
        .map(|v| v.as_tensor().clone())
        .collect();
    let (mu, log_var) = base.encode_latent(&data(5, 6, 2)).unwrap();
    let (m1m2, plain) = m2_on_features(base).unwrap();
    let x = data(5, 6, 2);
    let ids = [10u64, 11, 12, 13, 14];
    let labels = [Some(0), None, Some(2), None, None];
    let noise = Noise::new(9);
    let step = 7;
    let eps = noise
        .rows(Purpose::Features, step, &ids, 3, &Device::Cpu)
        .unwrap();
    let features = reparameterise(&mu, &log_var, &eps).unwrap();
    let input = |x| Input {
        x,
        labels: &labels,
        ids: &ids,
    };
    let a = loss(&m1m2, &input(&x), &noise, step);
    let b = loss(&plain, &input(&features), &noise, step);
    for (name, term) in &a.terms {
        let (u, v) = (mean(term), mean(&b.terms[name]));
        assert!(
            (u - v).abs() <= 1e-5 * v.abs().max(1.0),
            "{name}: {u} vs {v}"
        );
    }
    let grads = a.loss.backward().unwrap();
    assert!(
        base_vars.iter().all(|v| grads.get(v).is_none()),
        "the VAE is frozen"
    );
    assert!(m1m2
        .params()
        .vars()
        .values()
        .all(|v| grads.get(v.as_tensor()).is_some()));
    // Another step draws other features.
    let c = loss(&m1m2, &input(&x), &noise, step + 1);
    assert_ne!(mean(&a.terms["loss"]), mean(&c.terms["loss"]));
    // Pictures are of examples, not of features.
    let drawn = m1m2
        .sample(4, 1, Some(&[0, 1, 2, 0]), &Device::Cpu)
        .unwrap();
    assert_eq!(drawn.dims(), [4, 6]);
    assert_eq!(m1m2.reconstruct(&input(&x)).unwrap().dims(), [5, 6]);
    let pictures = m1m2.pictures(&input(&x)).unwrap();
    assert_eq!(pictures[0].values.len(), 5 * 3 * 6);
}

#[test]
fn m2_refuses_features_it_cannot_read() {
    let refused = |base: Vae| m2_on_features(base).err().expect("refused");
    let conditional = Vae::conditional(
        spec(LikelihoodKind::Bernoulli, Activation::Relu),
        3,
        &Device::Cpu,
        5,
    )
    .unwrap();
    let err = refused(conditional);
    assert!(
        err.contains("no continuous latent to read without a label"),
        "{err}"
    );
    let wider = ModelSpec {
        input_shape: vec![8],
        ..spec(LikelihoodKind::Bernoulli, Activation::Relu)
    };
    let err = refused(Vae::new(wider, &Device::Cpu, 5).unwrap());
    assert!(
        err.contains("encodes examples of 8 values, but data.train's have 6"),
        "{err}"
    );
    let cfg = M2Config {
        features_from: "m1-run".into(),
        ..M2Config::default()
    };
    let base = || {
        Box::new(
            Vae::new(
                spec(LikelihoodKind::Bernoulli, Activation::Relu),
                &Device::Cpu,
                5,
            )
            .unwrap(),
        )
    };
    let err = M2::new(
        &spec(LikelihoodKind::Bernoulli, Activation::Relu),
        &cfg,
        Some(base()),
        &Device::Cpu,
        1,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("model.likelihood = \"bernoulli\""), "{err}");
    let conv = ModelSpec {
        architecture: Architecture::Conv,
        ..spec(LikelihoodKind::GaussianPerDim, Activation::Relu)
    };
    let err = M2::new(&conv, &cfg, Some(base()), &Device::Cpu, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("expected \"mlp\""), "{err}");
}

#[test]
fn gradients_of_m2_match_finite_differences() {
    let x = data(5, 6, 2);
    let ids = [1u64, 2, 3, 4, 5];
    let labels = [Some(0), None, Some(2), None, None];
    check_model_gradients(&m2(2.0), &x, &ids, &labels);
}

/// M2's unlabeled bound enumerates every class exactly: for a batch of one unlabeled row it is
/// `Σ_y q(y|x)·L(x,y) + Σ_y q(y|x)·log q(y|x)`, each `L(x,y)` the bound of the row labeled `y`.
#[test]
fn the_unlabeled_bound_is_the_exact_sum_over_classes() {
    let model = m2(0.0);
    let x = data(1, 6, 4);
    let ids = [42u64];
    let noise = Noise::new(3);
    let with = |label: Option<i64>| {
        let labels = [label];
        let input = Input {
            x: &x,
            labels: &labels,
            ids: &ids,
        };
        mean(
            &loss(&model, &input, &noise, 0).terms[if label.is_some() {
                "neg_elbo_labeled"
            } else {
                "neg_elbo"
            }],
        )
    };
    let q: Vec<f64> = candle_nn::ops::softmax(&model.logits(&x).unwrap(), D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let direct: f64 = (0..3)
        .map(|y| q[y] * (with(Some(y as i64)) + q[y].ln()))
        .sum();
    let enumerated = with(None);
    assert!(
        (enumerated - direct).abs() < 1e-3 * direct.abs(),
        "{enumerated} vs {direct}"
    );
}

/// The classifier learns from labels only through its cross-entropy: the labeled bound gives
/// q(y|x) no gradient, and the cross-entropy gives the VAE none.
#[test]
fn the_classifier_term_reaches_only_the_classifier() {
    let x = data(3, 6, 8);
    let ids = [1u64, 2, 3];
    let labels = [Some(0), Some(1), Some(2)];
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let noise = Noise::new(1);
    let grads = |alpha: f64| -> BTreeMap<String, Vec<f32>> {
        let model = m2(alpha);
        let g = loss(&model, &input, &noise, 0).loss.backward().unwrap();
        model
            .params()
            .vars()
            .iter()
            .map(|(name, var)| {
                let values = g.get(var.as_tensor()).map_or_else(
                    || vec![0.0; var.elem_count()],
                    |t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                (name.clone(), values)
            })
            .collect()
    };
    let (bound_only, with_ce) = (grads(0.0), grads(1.0));
    for (name, g) in &bound_only {
        let classifier = name.starts_with("classifier.");
        let zero = g.iter().all(|v| *v == 0.0);
        assert_eq!(
            zero, classifier,
            "{name}: the labeled bound moves the VAE, never the classifier"
        );
        let moved = with_ce[name]
            .iter()
            .zip(g)
            .any(|(a, b)| (a - b).abs() > 1e-7);
        assert_eq!(
            moved, classifier,
            "{name}: the cross-entropy moves the classifier, never the VAE"
        );
    }
}

#[test]
fn the_m2_iw_bound_enumerates_the_classes_is_above_the_elbo_and_grows_with_k() {
    let model = m2(1.0);
    let x = data(64, 6, 3);
    let ids: Vec<u64> = (0..64).collect();
    let labels: Vec<Option<i64>> = (0..64).map(|i| Some(i % 3)).collect();
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let noise = Noise::new(2);
    let figures = |k: usize| {
        let mut e = model
            .evaluator(EvalOptions {
                noise: &noise,
                iw_samples: Some(k),
                max_rows: 1 << 20,
            })
            .unwrap();
        e.add(&input).unwrap();
        let m = e.finish();
        let value = |key: &str| match &m[key] {
            Metric::Value(v) => *v,
            other => panic!("{key}: {other:?}"),
        };
        (value("neg_elbo"), value("nll_iw"), value("accuracy"))
    };
    let (neg_elbo, one, accuracy) = figures(1);
    let (_, many, _) = figures(50);
    assert!(
        one <= neg_elbo + 1e-3,
        "k = 1: {one} vs the ELBO's {neg_elbo}"
    );
    assert!(many < one, "k = 50 is tighter: {many} vs {one}");
    assert!((0.0..=1.0).contains(&accuracy));
}
