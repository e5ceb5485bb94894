//! The VQ-VAE: the quantiser on fixed inputs, the EMA codebook against a plain f64
//! reference, the update statistics and gradients of a batch split across ranks against the
//! whole batch, dead-code restarts, decoder gradients against finite differences, bad configs.

mod common;

use candle_core::{Device, Tensor};
use elbo_models::{
    nearest_codes, round_statistics, whole_batch_statistics, Activation, Architecture, CodeModel,
    CodebookInit, CodebookLearning, ComposedForms, Input, LikelihoodKind, LossOutput, Model,
    ModelSpec, Noise, Objective, StepContext, VqVae, VqVaeConfig, CODEBOOK, EMA_COUNT, EMA_SUM,
    RESTART_SLOTS, SEED_SLOTS,
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

/// The loss output of the rows `ids` of `x`, as one rank of a global batch of `global` rows
/// sees it at step `step`.
fn loss_output(m: &VqVae, x: &Tensor, ids: &[u64], global: u64, step: u64) -> LossOutput {
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
    m.loss(&input, &ctx).unwrap()
}

/// The update statistics (and the loss) of `rows` of `x`, as one rank of a global batch of
/// `global` rows sees them.
fn step(m: &VqVae, x: &Tensor, ids: &[u64], global: u64, step: u64) -> (Vec<f32>, Tensor) {
    let out = loss_output(m, x, ids, global, step);
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

/// The composed forms (what a GPU runs: the search as one matrix product and an argmin, the
/// one-hot counts and sums of the assignments and of the restart candidates as others, on the
/// device) give the host search's codes and the same update statistics and loss, with and
/// without dead codes, at either level count.
#[test]
fn the_composed_search_and_statistics_match_the_host_forms() {
    for (levels, threshold) in [(1, 0.5), (1, 2.0), (2, 0.5), (2, 2.0)] {
        let cfg = VqVaeConfig {
            restart_threshold: threshold,
            ..config()
        };
        let m = VqVae::new(
            &spec(LikelihoodKind::Bernoulli),
            cfg,
            levels,
            &Device::Cpu,
            3,
        )
        .unwrap();
        let x = data(12, 6);
        let ids: Vec<u64> = (40..52).collect();
        let run = || (m.encode_codes(&x).unwrap(), step(&m, &x, &ids, 12, 3));
        let (codes, (stats, loss)) = run();
        let (composed_codes, (composed_stats, composed_loss)) = {
            let _composed = ComposedForms::on();
            run()
        };
        let case = format!("{levels} level(s), restart threshold {threshold}");
        assert_eq!(codes, composed_codes, "{case}: codes");
        assert_eq!(stats.len(), composed_stats.len(), "{case}");
        for (i, (a, b)) in stats.iter().zip(&composed_stats).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "{case}: statistic [{i}] {a} vs {b}"
            );
        }
        // Each level's statistics: counts (K), sums (K·D), then the restart candidates, which
        // every code's slots collect (the update keeps the dead codes').
        let codes = config().codes as usize;
        assert_eq!(composed_stats.len() % levels, 0, "{case}");
        for level in composed_stats.chunks(composed_stats.len() / levels) {
            assert!(
                level[codes + codes * DIM..].iter().any(|c| *c > 0.0),
                "{case}: the slots found candidates"
            );
        }
        let (a, b) = (
            loss.to_scalar::<f32>().unwrap(),
            composed_loss.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{case}: loss {a} vs {b}");
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
        if restart {
            // The live code's slots found a single candidate too; it is not restarted.
            let live = used[0] as usize;
            let slots = &stats[8 + 8 * DIM + live * RESTART_SLOTS..][..RESTART_SLOTS];
            assert!(slots.contains(&1.0), "the live code's slots: {slots:?}");
            assert!(
                count[live] > 1.5,
                "the live code keeps its count: {count:?}"
            );
            assert!(
                !z.chunks(DIM).any(|out| out == &after[live * DIM..][..DIM]),
                "the live code is not moved to an encoder output"
            );
        }
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

/// Each step's figures of a level, computed on the codebook's device: the codes alive (an EMA
/// count of at least the restart threshold, and at least 1) and the perplexity of the EMA
/// counts, against the host formulas on the counts after a few updates.
#[test]
fn the_step_figures_are_the_ema_counts_alive_and_perplexity() {
    for threshold in [0.0, 1.0, 2.0] {
        let mut m = model(VqVaeConfig {
            restart_threshold: threshold,
            decay: 0.5,
            ..config()
        });
        let ids: Vec<u64> = (0..6).collect();
        for s in 0..3 {
            let (stats, _) = step(&m, &data(6, 20 + s), &ids, 6, s);
            m.update_state(&stats, s).unwrap();
        }
        let count: Vec<f64> = m
            .buffers()
            .unwrap()
            .values(EMA_COUNT)
            .unwrap()
            .iter()
            .map(|n| f64::from(*n))
            .collect();
        let alive = count.iter().filter(|n| **n >= threshold.max(1.0)).count();
        let total: f64 = count.iter().sum();
        let perplexity = (-count
            .iter()
            .filter(|n| **n > 0.0)
            .map(|n| n / total * (n / total).ln())
            .sum::<f64>())
        .exp();
        assert!(
            alive > 0 && alive < 8,
            "threshold {threshold}: some codes alive, some not: {count:?}"
        );
        let out = loss_output(&m, &data(6, 30), &ids, 6, 3);
        let figure = |name: &str| {
            let t = &out.terms[name];
            f64::from(t.sum.to_scalar::<f32>().unwrap()) / t.count
        };
        assert_eq!(figure("codes_alive"), alive as f64, "threshold {threshold}");
        let p = figure("perplexity");
        assert!(
            (p - perplexity).abs() <= 1e-5 * perplexity,
            "threshold {threshold}: perplexity {p} vs {perplexity}"
        );
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
    refused(
        bern(),
        VqVaeConfig {
            codebook: CodebookLearning::Loss,
            restart_threshold: 0.0,
            init: CodebookInit::Kmeans,
            ..config()
        },
        "init",
    );
    refused(
        bern(),
        VqVaeConfig {
            kmeans_iterations: 0,
            ..config()
        },
        "kmeans_iterations",
    );
}

/// A model whose codebooks wait for their k-means initialisation: 8 codes, `iterations`
/// Lloyd rounds.
fn kmeans_model(levels: usize, iterations: u32) -> VqVae {
    let cfg = VqVaeConfig {
        init: CodebookInit::Kmeans,
        kmeans_iterations: iterations,
        restart_threshold: 2.0,
        ..config()
    };
    VqVae::new(
        &spec(LikelihoodKind::Bernoulli),
        cfg,
        levels,
        &Device::Cpu,
        3,
    )
    .unwrap()
}

/// The context of step 0 of a global batch of `global_rows`.
fn first_step<'a>(noise: &'a Noise, global_rows: u64, batch_stats: &'a [f32]) -> StepContext<'a> {
    StepContext {
        step: 0,
        noise,
        global_rows,
        batch_stats,
    }
}

/// The k-means rounds of rows split across two ranks (3 + 9 rows), each round's sums added as
/// the all-reduce adds them before the next round, equal one process's rounds; so do the
/// loss's update statistics and gradients at that step, for one level and two.
#[test]
fn kmeans_rounds_split_across_ranks_add_up_to_one_process() {
    for levels in [1, 2] {
        let m = kmeans_model(levels, 3);
        let x = data(12, 8);
        let ids: Vec<u64> = (40..52).collect();
        let labels = vec![None; 12];
        let noise = Noise::new(11);
        let whole_input = Input {
            x: &x,
            labels: &labels,
            ids: &ids,
        };
        let rounds = m.batch_rounds().unwrap();
        let k = 8;
        let per_level = [
            k * SEED_SLOTS * (1 + DIM),
            k + k * DIM,
            k + k * DIM,
            k + k * DIM,
        ];
        assert_eq!(rounds, per_level.repeat(levels));
        let whole = whole_batch_statistics(&m, &whole_input, &first_step(&noise, 12, &[])).unwrap();
        let parts = [(0, 3), (3, 9)];
        let xs: Vec<Tensor> = parts
            .iter()
            .map(|(a, n)| x.narrow(0, *a, *n).unwrap())
            .collect();
        let mut split: Vec<f32> = Vec::new();
        for (round, len) in rounds.iter().enumerate() {
            let mut sums = vec![0f32; *len];
            for ((a, n), xr) in parts.iter().zip(&xs) {
                let input = Input {
                    x: xr,
                    labels: &labels[*a..a + n],
                    ids: &ids[*a..a + n],
                };
                let part =
                    round_statistics(&m, &input, &first_step(&noise, 12, &split), round, *len)
                        .unwrap();
                for (s, p) in sums.iter_mut().zip(part) {
                    *s += p;
                }
            }
            split.extend(sums);
        }
        assert_eq!(split.len(), whole.len());
        for (i, (w, s)) in whole.iter().zip(&split).enumerate() {
            assert!((w - s).abs() <= 1e-5 * (1.0 + w.abs()), "[{i}] {w} vs {s}");
        }
        let stats = &whole[..];
        let out = m
            .loss(&whole_input, &first_step(&noise, 12, stats))
            .unwrap();
        let upd = values(out.update_stats.as_ref().unwrap());
        let mut upd_split = vec![0f32; upd.len()];
        let mut grads_split = Vec::new();
        for ((a, n), xr) in parts.iter().zip(&xs) {
            let input = Input {
                x: xr,
                labels: &labels[*a..a + n],
                ids: &ids[*a..a + n],
            };
            let o = m.loss(&input, &first_step(&noise, 12, stats)).unwrap();
            for (s, p) in upd_split
                .iter_mut()
                .zip(values(o.update_stats.as_ref().unwrap()))
            {
                *s += p;
            }
            grads_split.push(o.loss.backward().unwrap());
        }
        for (i, (w, s)) in upd.iter().zip(&upd_split).enumerate() {
            assert!(
                (w - s).abs() <= 1e-5 * (1.0 + w.abs()),
                "update [{i}] {w} vs {s}"
            );
        }
        let grads = out.loss.backward().unwrap();
        for (name, var) in m.params().vars() {
            let g =
                |gs: &candle_core::backprop::GradStore| values(gs.get(var.as_tensor()).unwrap());
            for ((w, a), b) in g(&grads)
                .iter()
                .zip(g(&grads_split[0]))
                .zip(g(&grads_split[1]))
            {
                assert!(
                    (w - (a + b)).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{name}: {w} vs {a} + {b}"
                );
            }
        }
        // Without the rounds' sums, the step refuses instead of training on a random codebook.
        let e = m
            .loss(&whole_input, &first_step(&noise, 12, &[]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("k-means"), "{e}");
    }
}

/// One process's k-means: the seeding picks encoder outputs of the batch, the Lloyd rounds
/// are a plain Lloyd iteration from those seeds, the step's EMA update starts from N = 1 at one
/// more Lloyd step's centroids (no restarts), and the rounds are not asked for again.
#[test]
fn kmeans_initialises_the_codebook_like_a_plain_lloyd_from_its_seeds() {
    let iterations = 4;
    let mut m = kmeans_model(1, iterations);
    let x = data(16, 9);
    let ids: Vec<u64> = (0..16).collect();
    let labels = vec![None; 16];
    let noise = Noise::new(5);
    let input = Input {
        x: &x,
        labels: &labels,
        ids: &ids,
    };
    let ctx = first_step(&noise, 16, &[]);
    let initial = m.buffers().unwrap().values(CODEBOOK).unwrap();
    let stats = whole_batch_statistics(&m, &input, &ctx).unwrap();
    let z: Vec<f64> = outputs(&m, &x).iter().map(|v| f64::from(*v)).collect();
    let (k, s) = (8, SEED_SLOTS);
    // The seeds, by the documented rule, from the seeding round's candidates.
    let (counts, sums) = stats[..k * s * (1 + DIM)].split_at(k * s);
    let mut centroids: Vec<f64> = initial.iter().map(|v| f64::from(*v)).collect();
    let mut singles = 0;
    for code in 0..k {
        let slots: Vec<usize> = (code * s..(code + 1) * s).collect();
        let chosen = slots.iter().find(|t| counts[**t] == 1.0).or_else(|| {
            slots
                .iter()
                .filter(|t| counts[**t] > 0.0)
                .min_by(|a, b| counts[**a].total_cmp(&counts[**b]))
        });
        if let Some(t) = chosen {
            let seed: Vec<f64> = (0..DIM)
                .map(|j| f64::from(sums[t * DIM + j]) / f64::from(counts[*t]))
                .collect();
            if counts[*t] == 1.0 {
                singles += 1;
                assert!(
                    z.chunks(DIM)
                        .any(|row| row.iter().zip(&seed).all(|(a, b)| (a - b).abs() < 1e-6)),
                    "code {code}'s seed is no encoder output"
                );
            }
            centroids[code * DIM..][..DIM].copy_from_slice(&seed);
        }
    }
    assert!(
        singles >= 6,
        "most codes are seeded by one output: {singles}"
    );
    let sse = |c: &[f64]| -> f64 {
        z.chunks(DIM)
            .map(|row| {
                c.chunks(DIM)
                    .map(|e| row.iter().zip(e).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
                    .fold(f64::INFINITY, f64::min)
            })
            .sum()
    };
    // Plain Lloyd, one iteration per round and one more for the step's EMA update.
    let mut errors = vec![sse(&centroids)];
    let mut last_counts = vec![0.0; k];
    for _ in 0..=iterations {
        let book: Vec<f32> = centroids.iter().map(|v| *v as f32).collect();
        let z32: Vec<f32> = z.iter().map(|v| *v as f32).collect();
        let codes = nearest_codes(&z32, &book, DIM);
        let mut n = vec![0.0; k];
        let mut sum = vec![0.0; k * DIM];
        for (row, c) in z.chunks(DIM).zip(&codes) {
            n[*c as usize] += 1.0;
            for j in 0..DIM {
                sum[*c as usize * DIM + j] += row[j];
            }
        }
        for code in (0..k).filter(|c| n[*c] > 0.0) {
            for j in 0..DIM {
                centroids[code * DIM + j] = sum[code * DIM + j] / n[code];
            }
        }
        errors.push(sse(&centroids));
        last_counts = n;
    }
    for w in errors.windows(2) {
        assert!(w[1] <= w[0] + 1e-9, "Lloyd's error never grows: {errors:?}");
    }
    assert!(
        errors[errors.len() - 1] < sse(&initial.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())
    );
    let out = m
        .loss(
            &input,
            &StepContext {
                batch_stats: &stats,
                ..ctx
            },
        )
        .unwrap();
    let update = values(out.update_stats.as_ref().unwrap());
    assert!(
        update[k + k * DIM..].iter().all(|c| *c == 0.0),
        "no restart candidates at the initialising step"
    );
    m.update_state(&update, 0).unwrap();
    let count = m.buffers().unwrap().values(EMA_COUNT).unwrap();
    let codebook = m.buffers().unwrap().values(CODEBOOK).unwrap();
    for code in 0..k {
        // The EMA's ordinary step from its start (N = 1) at the centroids.
        let n = 0.99 + 0.01 * last_counts[code];
        assert!(
            (f64::from(count[code]) - n).abs() < 1e-6,
            "code {code}'s count {}",
            count[code]
        );
        if last_counts[code] > 0.0 {
            for j in 0..DIM {
                let (a, b) = (
                    f64::from(codebook[code * DIM + j]),
                    centroids[code * DIM + j],
                );
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "code {code}: {a} vs {b}"
                );
            }
        }
    }
    assert!(m.batch_rounds().unwrap().is_empty(), "initialised once");
    // The next step is an ordinary one.
    let next = m.loss(&input, &StepContext { step: 1, ..ctx }).unwrap();
    assert!(next.update_stats.is_some());
}
