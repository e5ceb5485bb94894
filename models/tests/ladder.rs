//! The ladder VAE: the precision-weighted merge and the Gaussian KL against closed forms and
//! Monte Carlo, the IW bound against the ELBO, gradients against finite differences, figures
//! per layer, bad configs.

mod common;

use candle_core::{Device, Tensor};
use elbo_models::{
    gaussian_kl_between, precision_merge, whole_batch_statistics, Activation, Architecture,
    EvalOptions, Input, Ladder, LadderConfig, LikelihoodKind, Metric, Model, ModelSpec, Noise,
    Objective, StepContext,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn spec(objective: Objective) -> ModelSpec {
    ModelSpec {
        input_shape: vec![12],
        latent_dim: 2,
        architecture: Architecture::Mlp,
        hidden: vec![8],
        activation: Activation::Tanh,
        likelihood: LikelihoodKind::Bernoulli,
        variance: 1.0,
        log_var_clamp: 8.0,
        objective,
    }
}

fn config() -> LadderConfig {
    LadderConfig {
        latent_dims: vec![3],
        hidden: vec![10, 6],
        depth: 1,
        weight_norm: false,
        batch_norm: false,
    }
}

fn ladder() -> Ladder {
    Ladder::new(spec(Objective::default()), &config(), &Device::Cpu, 4).unwrap()
}

fn data(rows: usize, seed: u64) -> Tensor {
    binary(rows, 12, seed)
}

fn binary(rows: usize, dim: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * dim)
        .map(|_| f32::from(rng.random_bool(0.4)))
        .collect();
    Tensor::from_vec(v, (rows, dim), &Device::Cpu).unwrap()
}

/// A two-layer ladder over 28-pixel images: convolutions before the first block and after the
/// decoder's.
fn conv_ladder(batch_norm: bool) -> Ladder {
    let spec = ModelSpec {
        input_shape: vec![1, 28, 28],
        architecture: Architecture::Conv,
        ..spec(Objective::default())
    };
    let cfg = LadderConfig {
        batch_norm,
        ..config()
    };
    Ladder::new(spec, &cfg, &Device::Cpu, 4).unwrap()
}

#[test]
fn the_precision_weighted_merge_matches_its_closed_form() {
    // N(1, 1) and N(3, 3): σ² = 1/(1 + 1/3) = 0.75, μ = (1·1 + 3·⅓)·0.75 = 1.5.
    let (mu, log_var) = precision_merge(
        &t(&[1.0, 0.0]),
        &t(&[0.0, 2.0f32.ln()]),
        &t(&[3.0, 4.0]),
        &t(&[3.0f32.ln(), 2.0f32.ln()]),
    )
    .unwrap();
    let (mu, var): (Vec<f32>, Vec<f32>) = (
        values(&mu),
        values(&log_var).iter().map(|l| l.exp()).collect(),
    );
    for (got, want) in mu.iter().zip([1.5, 2.0]).chain(var.iter().zip([0.75, 1.0])) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

#[test]
fn the_kl_between_gaussians_matches_its_closed_form_and_monte_carlo() {
    let (mq, vq, mp, vp) = (0.3f64, 0.5f64, -0.4f64, 2.0f64);
    let closed = 0.5 * ((vp / vq).ln() + (vq + (mq - mp).powi(2)) / vp - 1.0);
    let kl = values(
        &gaussian_kl_between(
            &t(&[mq as f32]),
            &t(&[vq.ln() as f32]),
            &t(&[mp as f32]),
            &t(&[vp.ln() as f32]),
        )
        .unwrap(),
    )[0];
    assert!((f64::from(kl) - closed).abs() < 1e-6, "{kl} vs {closed}");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = 200_000;
    let samples: Vec<f64> = (0..n)
        .map(|_| {
            let e: f64 = StandardNormal.sample(&mut rng);
            let z = mq + vq.sqrt() * e;
            let log_q = -0.5 * (vq.ln() + e * e);
            let log_p = -0.5 * (vp.ln() + (z - mp).powi(2) / vp);
            log_q - log_p
        })
        .collect();
    let mean = samples.iter().sum::<f64>() / n as f64;
    let sd = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let se = sd / (n as f64).sqrt();
    assert!(
        (mean - f64::from(kl)).abs() < 3.0 * se,
        "Monte Carlo {mean} ± {se} vs analytic {kl}"
    );
    // Against N(0, 1) it is the VAE's KL.
    let standard =
        values(&gaussian_kl_between(&t(&[0.7]), &t(&[-0.3]), &t(&[0.0]), &t(&[0.0])).unwrap())[0];
    let vae = 0.5 * ((-0.3f32).exp() + 0.49 - 1.0 + 0.3);
    assert!((standard - vae).abs() < 1e-6);
}

fn evaluate(m: &Ladder, x: &Tensor, ids: &[u64], k: Option<usize>) -> elbo_models::Metrics {
    let labels = vec![None; ids.len()];
    let noise = Noise::new(9);
    let mut e = m
        .evaluator(EvalOptions {
            noise: &noise,
            iw_samples: k,
            max_rows: 4096,
        })
        .unwrap();
    e.add(&Input {
        x,
        labels: &labels,
        ids,
    })
    .unwrap();
    e.finish()
}

fn value(m: &elbo_models::Metrics, key: &str) -> f64 {
    match &m[key] {
        Metric::Value(v) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

/// One example seen by 4,000 rows of their own noise: the k = 1 bound (every layer sampled,
/// log p − log q by Monte Carlo) averages to the ELBO (analytic KL per layer) within 3
/// standard errors, and the bound tightens as k grows.
#[test]
fn the_k1_bound_is_the_elbo_in_expectation_and_grows_with_k() {
    let m = ladder();
    let one = data(1, 3);
    let n = 4000;
    let x = one.broadcast_as((n, 12)).unwrap().contiguous().unwrap();
    let ids: Vec<u64> = (0..n as u64).collect();
    let figures = evaluate(&m, &x, &ids, Some(1));
    let (neg_elbo, nll1) = (value(&figures, "neg_elbo"), value(&figures, "nll_iw"));
    // The per-row spread of −log w, for the standard error.
    let per_row: Vec<f64> = (0..40)
        .map(|i| {
            let rows: Vec<u64> = (i * 100..(i + 1) * 100).collect();
            let xs = one.broadcast_as((100, 12)).unwrap().contiguous().unwrap();
            value(&evaluate(&m, &xs, &rows, Some(1)), "nll_iw")
        })
        .collect();
    let mean = per_row.iter().sum::<f64>() / 40.0;
    let sd = (per_row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 39.0).sqrt();
    let se = sd / 40f64.sqrt();
    assert!(
        (nll1 - neg_elbo).abs() < 3.0 * se.max(1e-3),
        "k = 1 bound {nll1} vs ELBO {neg_elbo} (standard error {se})"
    );
    let small = x.narrow(0, 0, 200).unwrap();
    let bounds: Vec<f64> = [1, 10, 100]
        .iter()
        .map(|k| value(&evaluate(&m, &small, &ids[..200], Some(*k)), "nll_iw"))
        .collect();
    assert!(
        bounds[0] > bounds[1] && bounds[1] > bounds[2],
        "−log p(x) bounds for k = 1, 10, 100: {bounds:?}"
    );
}

/// The loss of `m` on a fixed batch at step 2.
fn fixed_loss(m: &Ladder) -> Tensor {
    let x = data(3, 9);
    let ids = [1u64, 2, 3];
    let labels = [None, None, None];
    let noise = Noise::new(5);
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let ctx = StepContext {
        step: 2,
        noise: &noise,
        global_rows: 3,
        batch_stats: &[],
    };
    m.loss(&input, &ctx).unwrap().loss
}

#[test]
fn gradients_match_finite_differences() {
    for (objective, weight_norm) in [
        (Objective::default(), false),
        (
            Objective {
                beta: 1.0,
                warmup_steps: 10,
                free_bits: 0.0,
            },
            false,
        ),
        (Objective::default(), true),
    ] {
        let cfg = LadderConfig {
            weight_norm,
            ..config()
        };
        let m = Ladder::new(spec(objective), &cfg, &Device::Cpu, 4).unwrap();
        let checked =
            common::check_gradients(m.params(), || fixed_loss(&m), |_| true, 2, (5e-3, 2e-2));
        assert!(checked >= 30, "{checked} values checked");
        if weight_norm {
            let names: Vec<&String> = m.params().vars().keys().collect();
            assert!(
                names.iter().any(|n| n.ends_with(".weight_g"))
                    && !names.iter().any(|n| n.ends_with(".weight")),
                "every dense layer weight-normalised: {names:?}"
            );
        }
    }
}

fn batch_normed(objective: Objective) -> Ladder {
    let cfg = LadderConfig {
        batch_norm: true,
        depth: 2,
        ..config()
    };
    Ladder::new(spec(objective), &cfg, &Device::Cpu, 4).unwrap()
}

/// The loss of `m` on the rows of `x` (ids 0, 1, …) at `step` as one process computes it:
/// every round of batch statistics first.
fn whole_batch_loss(m: &Ladder, x: &Tensor, step: u64) -> elbo_models::LossOutput {
    let rows = x.dim(0).unwrap();
    let ids: Vec<u64> = (0..rows as u64).collect();
    let labels = vec![None; rows];
    let noise = Noise::new(9);
    let input = Input {
        x,
        labels: &labels,
        ids: &ids,
    };
    let mut ctx = StepContext {
        step,
        noise: &noise,
        global_rows: rows as u64,
        batch_stats: &[],
    };
    let stats = whole_batch_statistics(m, &input, &ctx).unwrap();
    ctx.batch_stats = &stats;
    m.loss(&input, &ctx).unwrap()
}

/// Batch norm's gradient flows through the batch's moments: the loss, recomputed with the
/// moments of every perturbed parameter, moves as the gradient says — for every parameter,
/// γ and β among them, with KL warm-up and with free bits on.
#[test]
fn batch_norm_gradients_match_finite_differences() {
    let x = data(7, 11);
    for objective in [
        Objective::default(),
        Objective {
            beta: 1.0,
            warmup_steps: 10,
            free_bits: 0.0,
        },
        Objective {
            beta: 1.0,
            warmup_steps: 0,
            free_bits: 1e-4,
        },
    ] {
        let m = batch_normed(objective);
        let names: Vec<&String> = m.params().vars().keys().collect();
        assert!(
            names.iter().filter(|n| n.ends_with(".norm.weight")).count() == 8,
            "two normalised layers in each of the four blocks: {names:?}"
        );
        let checked = common::check_gradients(
            m.params(),
            || whole_batch_loss(&m, &x, 2).loss,
            |_| true,
            2,
            (5e-3, 2e-2),
        );
        assert!(checked >= 60, "{checked} values checked");
    }
}

/// Two ranks holding 3 and 4 of 7 rows, their rounds of batch statistics summed as the
/// all-reduce sums them, compute gradients and update statistics that add up to one process's:
/// a dense ladder with free bits, and a convolutional one.
#[test]
fn batch_norm_split_across_ranks_adds_up_to_one_process() {
    let dense = batch_normed(Objective {
        beta: 1.0,
        warmup_steps: 0,
        free_bits: 0.05,
    });
    assert_split_adds_up(&dense, &data(7, 11));
    assert_split_adds_up(&conv_ladder(true), &binary(7, 784, 11));
}

fn assert_split_adds_up(m: &Ladder, x: &Tensor) {
    let ids: Vec<u64> = (0..7).collect();
    let labels = [None; 7];
    let noise = Noise::new(9);
    let whole = whole_batch_loss(m, x, 2);
    let parts = [(0usize, 3usize), (3, 4)];
    let inputs: Vec<(Tensor, &[u64])> = parts
        .iter()
        .map(|&(at, n)| (x.narrow(0, at, n).unwrap(), &ids[at..at + n]))
        .collect();
    fn at_step_2<'a>(noise: &'a Noise, batch_stats: &'a [f32]) -> StepContext<'a> {
        StepContext {
            step: 2,
            noise,
            global_rows: 7,
            batch_stats,
        }
    }
    let mut stats: Vec<f32> = Vec::new();
    for (round, len) in m.statistics().batch.into_iter().enumerate() {
        let mut sum = vec![0f32; len];
        for (x, ids) in &inputs {
            let input = Input {
                x,
                labels: &labels[..ids.len()],
                ids,
            };
            let local = m
                .batch_statistics(&input, &at_step_2(&noise, &stats), round)
                .unwrap();
            for (s, v) in sum.iter_mut().zip(values(&local)) {
                *s += v;
            }
        }
        stats.extend(sum);
    }
    let mut grads: Vec<Vec<f32>> = Vec::new();
    let mut update = vec![0f32; m.statistics().update];
    for (x, ids) in &inputs {
        let input = Input {
            x,
            labels: &labels[..ids.len()],
            ids,
        };
        let out = m.loss(&input, &at_step_2(&noise, &stats)).unwrap();
        for (u, v) in update
            .iter_mut()
            .zip(values(out.update_stats.as_ref().unwrap()))
        {
            *u += v;
        }
        let g = out.loss.backward().unwrap();
        let flat: Vec<Vec<f32>> = m
            .params()
            .vars()
            .values()
            .map(|v| values(g.get(v.as_tensor()).unwrap()))
            .collect();
        if grads.is_empty() {
            grads = flat;
        } else {
            for (a, b) in grads.iter_mut().zip(flat) {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            }
        }
    }
    let g = whole.loss.backward().unwrap();
    for ((name, var), split) in m.params().vars().iter().zip(&grads) {
        let one = values(g.get(var.as_tensor()).unwrap());
        for (a, b) in one.iter().zip(split) {
            assert!((a - b).abs() <= 1e-5 + 1e-4 * a.abs(), "{name}: {a} vs {b}");
        }
    }
    for (a, b) in values(whole.update_stats.as_ref().unwrap())
        .iter()
        .zip(&update)
    {
        assert!((a - b).abs() <= 1e-4 + 1e-5 * a.abs(), "update {a} vs {b}");
    }
}

/// With the gradient sink on (as the trainer runs a model, beginning a backward pass of its
/// own between the rounds and the loss), a batch-normed ladder's step hands its gradients to
/// the sink, the ones its loss hands candle with the sink off, and nothing to candle beside
/// them — on every step, not adding the one before.
#[test]
fn batch_norm_hands_the_step_gradients_to_the_sink_when_it_is_on() {
    let x = data(7, 11);
    let m = batch_normed(Objective::default());
    let plain = whole_batch_loss(&m, &x, 2).loss.backward().unwrap();
    let sink = m.params().grad_sink().clone();
    m.params().enable_grad_sink();
    for _ in 0..2 {
        let ids: Vec<u64> = (0..7).collect();
        let noise = Noise::new(9);
        let input = Input {
            x: &x,
            labels: &[None; 7],
            ids: &ids,
        };
        let mut ctx = StepContext {
            step: 2,
            noise: &noise,
            global_rows: 7,
            batch_stats: &[],
        };
        let stats = whole_batch_statistics(&m, &input, &ctx).unwrap();
        ctx.batch_stats = &stats;
        sink.begin_step();
        let store = m.loss(&input, &ctx).unwrap().loss.backward().unwrap();
        assert_sink_holds(&m, &sink, &store, &plain);
    }
}

fn assert_sink_holds(
    m: &Ladder,
    sink: &elbo_models::GradSink,
    store: &candle_core::backprop::GradStore,
    plain: &candle_core::backprop::GradStore,
) {
    for (name, var) in m.params().vars() {
        let want = values(plain.get(var.as_tensor()).unwrap());
        let got = sink
            .with_gradient(name, |g| g.to_vec())
            .unwrap_or_else(|| panic!("{name}: no gradient in the sink"));
        assert!(
            store.get(var.as_tensor()).is_none(),
            "{name}: also handed to candle"
        );
        assert_eq!(got.len(), want.len(), "{name}");
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{name}: {a} vs {b}"
            );
        }
    }
}

/// The running moments move towards the batch's moments by the momentum each step; once they
/// have settled on one batch's, evaluation (normalised by them) computes what training
/// (normalised by the batch) does, to the variance's n/(n − 1).
#[test]
fn batch_norm_running_moments_settle_on_the_batch_and_serve_evaluation() {
    let mut m = batch_normed(Objective::default());
    let x = data(400, 2);
    let ids: Vec<u64> = (0..400).collect();
    let before = evaluate(&m, &x, &ids, None);
    let mut trained = None;
    for _ in 0..150 {
        let out = whole_batch_loss(&m, &x, 0);
        let stats = values(out.update_stats.as_ref().unwrap());
        m.update_state(&stats, 0).unwrap();
        trained = Some(out);
    }
    let out = trained.unwrap();
    let train = f64::from(out.terms["neg_elbo"].sum.to_scalar::<f32>().unwrap()) / 400.0;
    let after = evaluate(&m, &x, &ids, None);
    let (first, settled) = (value(&before, "neg_elbo"), value(&after, "neg_elbo"));
    assert!(
        (settled - train).abs() < 2e-3 * train,
        "evaluation {settled} vs training {train} (before settling: {first})"
    );
    assert!((first - train).abs() > 10.0 * (settled - train).abs());
    let buffers = m.buffers().expect("running moments");
    let names: Vec<&String> = buffers.vars().keys().collect();
    assert_eq!(names.len(), 16, "mean and variance of 8 layers: {names:?}");
}

/// The convolutional ladder's gradients, with and without batch norm, against finite
/// differences; its figures and samples have the images' size.
#[test]
fn a_convolutional_ladder_matches_finite_differences() {
    let x = binary(4, 784, 5);
    for batch_norm in [false, true] {
        let m = conv_ladder(batch_norm);
        let names: Vec<&String> = m.params().vars().keys().collect();
        assert!(
            names.iter().any(|n| n.starts_with("up0.conv"))
                && names.iter().any(|n| n.starts_with("decoder.conv")),
            "{names:?}"
        );
        let checked = common::check_gradients(
            m.params(),
            || whole_batch_loss(&m, &x, 2).loss,
            |_| true,
            2,
            (1e-2, 3e-2),
        );
        assert!(checked >= 40, "{checked} values checked");
        let ids: Vec<u64> = (0..4).collect();
        let figures = evaluate(&m, &x, &ids, Some(4));
        assert!(value(&figures, "nll_iw").is_finite());
        assert_eq!(m.sample(3, 1, None, &Device::Cpu).unwrap().dims(), [3, 784]);
    }
}

/// A weight-normalised ladder starts as the same function as the plain one of the same seed
/// (V drawn like W, g = ‖V‖ row by row).
#[test]
fn weight_norm_starts_as_the_plain_ladder() {
    let plain = Ladder::new(spec(Objective::default()), &config(), &Device::Cpu, 4).unwrap();
    let cfg = LadderConfig {
        weight_norm: true,
        ..config()
    };
    let normed = Ladder::new(spec(Objective::default()), &cfg, &Device::Cpu, 4).unwrap();
    let (a, b) = (
        fixed_loss(&plain).to_scalar::<f32>().unwrap(),
        fixed_loss(&normed).to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
}

#[test]
fn figures_and_terms_are_per_layer() {
    let m = ladder();
    assert_eq!(m.latent_dims(), [3, 2]);
    let terms = m.statistics().terms;
    assert!(terms.contains(&"kl_layer1") && terms.contains(&"kl_layer2"));
    assert!(!terms.contains(&"kl_layer3"));
    let x = data(6, 1);
    let ids: Vec<u64> = (0..6).collect();
    let labels = vec![None; 6];
    let noise = Noise::new(2);
    let out = m
        .loss(
            &Input {
                x: &x,
                labels: &labels,
                ids: &ids,
            },
            &StepContext {
                step: 0,
                noise: &noise,
                global_rows: 6,
                batch_stats: &[],
            },
        )
        .unwrap();
    let sum = |name: &str| f64::from(out.terms[name].sum.to_scalar::<f32>().unwrap());
    assert!(
        (sum("kl_layer1") + sum("kl_layer2") - sum("kl")).abs() < 1e-4 * sum("kl").abs(),
        "the layers' KL adds up to the KL"
    );
    let figures = evaluate(&m, &x, &ids, None);
    match (&figures["kl_layers"], &figures["active_units_layers"]) {
        (Metric::List(kl), Metric::List(active)) => {
            assert_eq!((kl.len(), active.len()), (2, 2));
            let total: f64 = kl.iter().sum();
            assert!((total - value(&figures, "kl")).abs() < 1e-6);
        }
        other => panic!("{other:?}"),
    }
    let pictures = m
        .pictures(&Input {
            x: &x,
            labels: &labels,
            ids: &ids,
        })
        .unwrap();
    let names: Vec<&str> = pictures.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["traversals_layer1", "traversals_layer2"]);
    assert_eq!(
        pictures[0].values.len(),
        3 * 9 * 12,
        "3 dims × 9 steps of layer 1"
    );
    let s = m.sample(5, 1, None, &Device::Cpu).unwrap();
    assert_eq!(s.dims(), [5, 12]);
}

#[test]
fn bad_configs_are_refused_with_the_key() {
    let refused = |spec: ModelSpec, config: LadderConfig, what: &str| {
        let e = Ladder::new(spec, &config, &Device::Cpu, 0)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"))
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    };
    let s = || spec(Objective::default());
    refused(
        s(),
        LadderConfig {
            latent_dims: vec![],
            hidden: vec![4],
            depth: 1,
            weight_norm: false,
            batch_norm: false,
        },
        "latent_dims",
    );
    refused(
        s(),
        LadderConfig {
            latent_dims: vec![3, 0],
            hidden: vec![4, 4, 4],
            depth: 1,
            weight_norm: false,
            batch_norm: false,
        },
        "latent_dims",
    );
    refused(
        s(),
        LadderConfig {
            hidden: vec![4, 4, 4],
            ..config()
        },
        "hidden",
    );
    refused(
        s(),
        LadderConfig {
            depth: 0,
            ..config()
        },
        "depth",
    );
    refused(
        s(),
        LadderConfig {
            weight_norm: true,
            batch_norm: true,
            ..config()
        },
        "batch_norm",
    );
    refused(
        ModelSpec {
            architecture: Architecture::Conv,
            ..s()
        },
        config(),
        "model.architecture",
    );
    refused(
        ModelSpec {
            latent_dim: 0,
            ..s()
        },
        config(),
        "latent_dim",
    );
}
