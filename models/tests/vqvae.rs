//! The VQ-VAE: the quantiser on fixed inputs, the EMA codebook against a plain f64
//! reference, the update statistics and gradients of a batch split across ranks against the
//! whole batch, dead-code restarts, decoder gradients against finite differences, bad configs.

mod common;

use candle_core::{Device, Tensor};
use elbo_models::{
    nearest_codes, Activation, Architecture, CodebookLearning, Input, LikelihoodKind, Model,
    ModelSpec, Noise, Objective, StepContext, VqVae, VqVaeConfig, CODEBOOK, EMA_COUNT, EMA_SUM,
    RESTART_SLOTS,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 4;

fn spec(likelihood: LikelihoodKind) -> ModelSpec {
    ModelSpec {
        input_shape: vec![1, 8, 8],
        latent_dim: DIM,
        architecture: Architecture::Conv,
        hidden: vec![16],
        activation: Activation::Relu,
        likelihood,
        variance: 0.1,
        log_var_clamp: 10.0,
        objective: Objective::default(),
    }
}

fn config() -> VqVaeConfig {
    VqVaeConfig {
        codes: 8,
        channels: vec![4, 6],
        residual_blocks: 1,
        residual_hidden: 3,
        ..VqVaeConfig::default()
    }
}

fn model(config: VqVaeConfig) -> VqVae {
    VqVae::new(&spec(LikelihoodKind::Bernoulli), config, 1, &Device::Cpu, 3).unwrap()
}

fn data(rows: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * 64).map(|_| rng.random_range(0.0..1.0)).collect();
    Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The encoder outputs of `x` as rows of D: (positions, D), row-major over (row, y, x).
fn outputs(m: &VqVae, x: &Tensor) -> Vec<f32> {
    values(
        &m.encode(x)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap(),
    )
}

/// The update statistics (and the loss) of `rows` of `x`, as one rank of a global batch of
/// `global` rows sees them.
fn step(m: &VqVae, x: &Tensor, ids: &[u64], global: u64, step: u64) -> (Vec<f32>, Tensor) {
    let labels = vec![None; ids.len()];
    let noise = Noise::new(11);
    let input = Input {
        x,
        labels: &labels,
        ids,
    };
    let ctx = StepContext {
        step,
        noise: &noise,
        global_rows: global,
        batch_stats: &[],
    };
    let out = m.loss(&input, &ctx).unwrap();
    (values(&out.update_stats.unwrap()), out.loss)
}

#[test]
fn the_nearest_code_wins_and_ties_go_to_the_lowest_index() {
    let codebook = [0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0];
    // (0.5, 0): codes 0 and 1 (and 3, its duplicate) are equally near → 0.
    // (0.9, 0.1) → 1 (not 3, its duplicate); (−2, 0) → 2; (0.1, −0.1) → 0.
    let z = [0.5, 0.0, 0.9, 0.1, -2.0, 0.0, 0.1, -0.1];
    assert_eq!(nearest_codes(&z, &codebook, 2), vec![0, 1, 2, 0]);
    // Thousands of rows (several parallel chunks): the same as one row at a time.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let z: Vec<f32> = (0..3000 * 3).map(|_| rng.random_range(-2.0..2.0)).collect();
    let cb: Vec<f32> = (0..7 * 3).map(|_| rng.random_range(-2.0..2.0)).collect();
    let all = nearest_codes(&z, &cb, 3);
    for (row, code) in z.chunks(3).zip(&all) {
        assert_eq!(nearest_codes(row, &cb, 3), vec![*code]);
        let d = |k: usize| -> f32 { (0..3).map(|j| (row[j] - cb[k * 3 + j]).powi(2)).sum() };
        assert!((0..7).all(|k| d(*code as usize) <= d(k)));
    }
}

/// A plain f64 EMA step with Laplace smoothing (the paper's appendix, sonnet's formulas).
fn reference_ema(n: &mut [f64], m: &mut [f64], counts: &[f64], sums: &[f64], g: f64) {
    for i in 0..n.len() {
        n[i] = g * n[i] + (1.0 - g) * counts[i];
    }
    for j in 0..m.len() {
        m[j] = g * m[j] + (1.0 - g) * sums[j];
    }
}

#[test]
fn three_ema_updates_match_a_plain_reference() {
    let mut m = model(VqVaeConfig {
        restart_threshold: 0.0,
        decay: 0.9,
        ..config()
    });
    let k = 8;
    let buffers = m.buffers().unwrap();
    let mut n: Vec<f64> = vec![1.0; k];
    let mut sum: Vec<f64> = buffers
        .values(EMA_SUM)
        .unwrap()
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    assert_eq!(buffers.values(EMA_COUNT).unwrap(), vec![1.0; k]);
    assert_eq!(
        buffers.values(EMA_SUM).unwrap(),
        buffers.values(CODEBOOK).unwrap(),
        "m starts at the codebook"
    );
    for s in 0..3 {
        let x = data(6, s);
        let ids: Vec<u64> = (0..6).collect();
        let codebook = m.buffers().unwrap().values(CODEBOOK).unwrap();
        let z = outputs(&m, &x);
        let codes = nearest_codes(&z, &codebook, DIM);
        let mut counts = vec![0.0; k];
        let mut sums = vec![0.0; k * DIM];
        for (v, c) in codes.iter().enumerate() {
            counts[*c as usize] += 1.0;
            for j in 0..DIM {
                sums[*c as usize * DIM + j] += f64::from(z[v * DIM + j]);
            }
        }
        let (stats, _) = step(&m, &x, &ids, 6, s);
        assert_eq!(stats.len(), k + k * DIM);
        for (a, b) in stats.iter().zip(counts.iter().chain(&sums)) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "statistic {a} vs {b}");
        }
        m.update_state(&stats, s).unwrap();
        reference_ema(&mut n, &mut sum, &counts, &sums, 0.9);
    }
    let total: f64 = n.iter().sum();
    let buffers = m.buffers().unwrap();
    let close = |name: &str, got: Vec<f32>, want: Vec<f64>| {
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{name}[{i}]: {a} vs reference {b}"
            );
        }
    };
    let codebook: Vec<f64> = (0..k * DIM)
        .map(|j| {
            let i = j / DIM;
            sum[j] / ((n[i] + 1e-5) / (total + k as f64 * 1e-5) * total)
        })
        .collect();
    close("ema_count", buffers.values(EMA_COUNT).unwrap(), n);
    close("ema_sum", buffers.values(EMA_SUM).unwrap(), sum);
    close("codebook", buffers.values(CODEBOOK).unwrap(), codebook);
}

/// Rows split across two ranks give the update statistics and gradients of the whole batch
/// (summed, as the all-reduce sums them) — restart candidates included, with every code dead —
/// for one level of codes and for two.
#[test]
fn a_batch_split_across_ranks_sums_to_the_whole_batch() {
    let cfg = VqVaeConfig {
        restart_threshold: 2.0,
        ..config()
    };
    for levels in [1, 2] {
        let m = VqVae::new(
            &spec(LikelihoodKind::Bernoulli),
            cfg.clone(),
            levels,
            &Device::Cpu,
            3,
        )
        .unwrap();
        let x = data(10, 4);
        let ids: Vec<u64> = (100..110).collect();
        let (whole, loss) = step(&m, &x, &ids, 10, 5);
        let (a, loss_a) = step(&m, &x.narrow(0, 0, 3).unwrap(), &ids[..3], 10, 5);
        let (b, loss_b) = step(&m, &x.narrow(0, 3, 7).unwrap(), &ids[3..], 10, 5);
        let k = 8;
        let per_level = k + k * DIM + k * RESTART_SLOTS * (1 + DIM);
        assert_eq!(whole.len(), levels * per_level);
        for level in 0..levels {
            let candidates = &whole[level * per_level + k + k * DIM..][..k * RESTART_SLOTS];
            assert!(
                candidates.iter().filter(|c| **c == 1.0).count() >= 6,
                "level {level}: many slots find one candidate: {candidates:?}"
            );
        }
        for (i, ((w, a), b)) in whole.iter().zip(&a).zip(&b).enumerate() {
            assert!(
                (w - (a + b)).abs() <= 1e-5 * (1.0 + w.abs()),
                "[{i}] {w} vs {a} + {b}"
            );
        }
        let grads = loss.backward().unwrap();
        let (ga, gb) = (loss_a.backward().unwrap(), loss_b.backward().unwrap());
        for (name, var) in m.params().vars() {
            let g =
                |gs: &candle_core::backprop::GradStore| values(gs.get(var.as_tensor()).unwrap());
            for ((w, a), b) in g(&grads).iter().zip(g(&ga)).zip(g(&gb)) {
                assert!(
                    (w - (a + b)).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{name}: {w} vs {a} + {b}"
                );
            }
        }
    }
}

/// VQ-VAE-2: a top grid at half the bottom's resolution, a codebook and statistics per level,
/// figures per level, and sides that must allow one more halving.
#[test]
fn a_two_level_vq_vae_has_a_codebook_and_figures_per_level() {
    let mut m = VqVae::new(
        &spec(LikelihoodKind::Bernoulli),
        config(),
        2,
        &Device::Cpu,
        3,
    )
    .unwrap();
    let names: Vec<&String> = m.buffers().unwrap().vars().keys().collect();
    assert_eq!(
        names,
        [
            "quantiser.bottom.codebook",
            "quantiser.bottom.ema_count",
            "quantiser.bottom.ema_sum",
            "quantiser.top.codebook",
            "quantiser.top.ema_count",
            "quantiser.top.ema_sum",
        ]
    );
    assert_eq!(
        m.statistics().terms,
        [
            "codes_alive_bottom",
            "codes_alive_top",
            "commitment_bottom",
            "commitment_top",
            "loss",
            "mse",
            "perplexity_bottom",
            "perplexity_top",
            "rec",
        ]
    );
    assert!(
        m.encode(&data(1, 0)).is_err(),
        "no bottom encoding without the top codes"
    );
    let x = data(5, 1);
    let ids: Vec<u64> = (0..5).collect();
    let (stats, _) = step(&m, &x, &ids, 5, 0);
    let per_level = 8 + 8 * DIM + 8 * RESTART_SLOTS * (1 + DIM);
    let bottom: f32 = stats[..8].iter().sum();
    let top: f32 = stats[per_level..per_level + 8].iter().sum();
    assert_eq!(
        (bottom, top),
        (5.0 * 4.0, 5.0),
        "a 2×2 bottom grid, a 1×1 top grid"
    );
    let before = m
        .buffers()
        .unwrap()
        .values("quantiser.top.ema_count")
        .unwrap();
    m.update_state(&stats, 0).unwrap();
    let after = m
        .buffers()
        .unwrap()
        .values("quantiser.top.ema_count")
        .unwrap();
    assert_ne!(
        before, after,
        "the top level's state is updated from its own statistics"
    );
    let labels = vec![None; 5];
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let noise = Noise::new(0);
    let options = elbo_models::EvalOptions {
        noise: &noise,
        iw_samples: None,
        max_rows: 100,
    };
    let mut eval = m.evaluator(options).unwrap();
    eval.add(&input).unwrap();
    let figures = eval.finish();
    for key in [
        "codes_used_bottom",
        "codes_used_top",
        "perplexity_top",
        "mse",
        "loss",
    ] {
        assert!(figures.contains_key(key), "{key} in {figures:?}");
    }
    let e = VqVae::new(
        &ModelSpec {
            input_shape: vec![1, 12, 12],
            ..spec(LikelihoodKind::Bernoulli)
        },
        config(),
        2,
        &Device::Cpu,
        0,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("multiples of 8"), "{e}");
}

/// A codebook far from the data: every output picks the same code, the other codes die after
/// one step, and the next step restarts them — each exactly at one encoder output of its batch
/// — while without restarts they stay where they were.
#[test]
fn dead_codes_restart_at_encoder_outputs_of_the_batch() {
    let far = VqVaeConfig {
        init_offset: 10.0,
        ..config()
    };
    for restart in [true, false] {
        let mut m = model(VqVaeConfig {
            restart_threshold: if restart { 1.0 } else { 0.0 },
            ..far.clone()
        });
        let ids: Vec<u64> = (0..16).collect();
        let x0 = data(16, 0);
        let codebook = m.buffers().unwrap().values(CODEBOOK).unwrap();
        let used = nearest_codes(&outputs(&m, &x0), &codebook, DIM);
        assert!(used.iter().all(|c| *c == used[0]), "collapsed: {used:?}");
        let (stats, _) = step(&m, &x0, &ids, 16, 0);
        m.update_state(&stats, 0).unwrap();
        let before = m.buffers().unwrap().values(CODEBOOK).unwrap();
        let x1 = data(16, 1);
        let z = outputs(&m, &x1);
        let (stats, _) = step(&m, &x1, &ids, 16, 1);
        m.update_state(&stats, 1).unwrap();
        let after = m.buffers().unwrap().values(CODEBOOK).unwrap();
        let count = m.buffers().unwrap().values(EMA_COUNT).unwrap();
        let mut restarted = 0;
        for code in (0..8).filter(|c| *c != used[0] as usize) {
            let new = &after[code * DIM..][..DIM];
            if count[code] == 1.0 {
                restarted += 1;
                assert!(
                    z.chunks(DIM).any(|out| out == new),
                    "restarted code {code} is an encoder output: {new:?}"
                );
            } else {
                assert!(
                    count[code] < 0.99,
                    "an unused code's count decays: {count:?}"
                );
                for (a, b) in new.iter().zip(&before[code * DIM..][..DIM]) {
                    assert!(
                        (a - b).abs() < 1e-3 * b.abs(),
                        "code {code} stays: {a} vs {b}"
                    );
                }
            }
        }
        if restart {
            assert!(restarted >= 4, "{restarted} of 7 dead codes restarted");
        } else {
            assert_eq!(restarted, 0, "without restarts dead codes stay");
        }
    }
}

#[test]
fn decoder_gradients_match_finite_differences() {
    for likelihood in [LikelihoodKind::Bernoulli, LikelihoodKind::GaussianFixed] {
        let m = VqVae::new(&spec(likelihood), config(), 1, &Device::Cpu, 3).unwrap();
        let x = data(3, 9);
        let ids = [1u64, 2, 3];
        let loss_of = || step(&m, &x, &ids, 3, 0).1;
        let decoder = |name: &str| name.starts_with("decoder.");
        let checked = common::check_gradients(m.params(), loss_of, decoder, 3, (2e-3, 2e-2));
        assert!(checked >= 18, "{checked} decoder values checked");
    }
}

#[test]
fn the_codebook_loss_trains_a_codebook_parameter() {
    let m = model(VqVaeConfig {
        codebook: CodebookLearning::Loss,
        restart_threshold: 0.0,
        ..config()
    });
    assert!(m.params().vars().contains_key(CODEBOOK));
    assert!(m.buffers().unwrap().values(EMA_SUM).is_err(), "no EMA sums");
    let terms = m.statistics().terms;
    assert!(terms.contains(&"codebook") && terms.windows(2).all(|w| w[0] < w[1]));
    let x = data(4, 2);
    let ids = [0u64, 1, 2, 3];
    let (stats, loss) = step(&m, &x, &ids, 4, 0);
    assert_eq!(stats.len(), 8, "usage counts only");
    assert_eq!(stats.iter().sum::<f32>(), 4.0 * 4.0, "4 rows × a 2×2 grid");
    let grads = loss.backward().unwrap();
    let var = &m.params().vars()[CODEBOOK];
    let g = values(grads.get(var.as_tensor()).unwrap());
    // ∂/∂e_k of Σ_rows mean‖sg(z) − e‖² / B = Σ_{positions at k} 2(e_k − z) / (D·grid·B).
    let codebook = values(var.as_tensor());
    let z = outputs(&m, &x);
    let codes = nearest_codes(&z, &codebook, DIM);
    let mut want = vec![0f64; 8 * DIM];
    for (v, c) in codes.iter().enumerate() {
        for j in 0..DIM {
            let k = *c as usize * DIM + j;
            want[k] += 2.0 * f64::from(codebook[k] - z[v * DIM + j]) / (DIM * 4 * 4) as f64;
        }
    }
    for (a, b) in g.iter().zip(&want) {
        assert!((f64::from(*a) - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn bad_configs_are_refused_with_the_key() {
    let refused = |spec: ModelSpec, config: VqVaeConfig, what: &str| {
        let e = VqVae::new(&spec, config, 1, &Device::Cpu, 0)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"))
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    };
    let bern = || spec(LikelihoodKind::Bernoulli);
    refused(
        bern(),
        VqVaeConfig {
            codes: 0,
            ..config()
        },
        "codes",
    );
    refused(
        bern(),
        VqVaeConfig {
            channels: vec![],
            ..config()
        },
        "channels",
    );
    refused(
        bern(),
        VqVaeConfig {
            codebook: CodebookLearning::Loss,
            ..config()
        },
        "restart_threshold",
    );
    refused(
        bern(),
        VqVaeConfig {
            decay: 1.0,
            ..config()
        },
        "decay",
    );
    refused(
        bern(),
        VqVaeConfig {
            channels: vec![4, 4, 4, 4],
            ..config()
        },
        "multiples of 16",
    );
    refused(
        ModelSpec {
            architecture: Architecture::Mlp,
            ..bern()
        },
        config(),
        "model.architecture",
    );
    refused(
        ModelSpec {
            latent_dim: 0,
            ..bern()
        },
        config(),
        "latent_dim",
    );
    refused(spec(LikelihoodKind::GaussianPerDim), config(), "likelihood");
}
