//! Flat-buffer optimisers against plain per-parameter reference implementations.

use elbo_settings::{LrSchedule, OptimizerKind};
use elbo_worker::{clip_grad_norm, global_norm, Optimizer, OptimizerConfig, Schedule};

/// Textbook Adam/AdamW/SGD in f64, one scalar at a time.
fn reference(kind: OptimizerKind, p0: &[f64], grads: &[Vec<f64>], lr: f64, wd: f64) -> Vec<f64> {
    let (b1, b2, eps, mu) = (0.9f64, 0.999f64, 1e-8, 0.9);
    let mut p = p0.to_vec();
    let (mut m, mut v, mut buf) = (vec![0.0; p.len()], vec![0.0; p.len()], vec![0.0; p.len()]);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..p.len() {
            match kind {
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let gi = if kind == OptimizerKind::Adam {
                        g[i] + wd * p[i]
                    } else {
                        g[i]
                    };
                    if kind == OptimizerKind::Adamw {
                        p[i] -= lr * wd * p[i];
                    }
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let mh = m[i] / (1.0 - b1.powi(t));
                    let vh = v[i] / (1.0 - b2.powi(t));
                    p[i] -= lr * mh / (vh.sqrt() + eps);
                }
                OptimizerKind::Sgd => {
                    let gi = g[i] + wd * p[i];
                    buf[i] = if t == 1 { gi } else { mu * buf[i] + gi };
                    p[i] -= lr * buf[i];
                }
            }
        }
    }
    p
}

#[test]
fn optimisers_match_the_reference_step_by_step() {
    let p0: Vec<f64> = (0..50)
        .map(|i| ((i * 37 % 17) as f64 - 8.0) / 10.0)
        .collect();
    let grads: Vec<Vec<f64>> = (0..6)
        .map(|t| {
            (0..50)
                .map(|i| (((i + 3 * t) * 13 % 11) as f64 - 5.0) / 7.0)
                .collect()
        })
        .collect();
    for kind in [
        OptimizerKind::Adam,
        OptimizerKind::Adamw,
        OptimizerKind::Sgd,
    ] {
        for wd in [0.0, 0.05] {
            let config = OptimizerConfig {
                weight_decay: wd,
                ..OptimizerConfig::defaults(kind)
            };
            let mut opt = Optimizer::new(config, p0.len()).unwrap();
            let mut p: Vec<f32> = p0.iter().map(|v| *v as f32).collect();
            for (t, g) in grads.iter().enumerate() {
                let g32: Vec<f32> = g.iter().map(|v| *v as f32).collect();
                opt.step(&mut p, &g32, 0.01);
                let want = reference(kind, &p0, &grads[..=t], 0.01, wd);
                for (a, b) in p.iter().zip(&want) {
                    assert!(
                        (f64::from(*a) - b).abs() < 1e-5,
                        "{kind:?} wd {wd} step {t}: {a} vs {b}"
                    );
                }
            }
            assert_eq!(opt.state().unwrap().step, 6);
        }
    }
}

#[test]
fn restoring_state_continues_identically() {
    let config = OptimizerConfig::defaults(OptimizerKind::Adam);
    let mut a = Optimizer::new(config, 3).unwrap();
    let mut pa = vec![1.0f32, -2.0, 0.5];
    a.step(&mut pa, &[0.1, 0.2, -0.3], 0.1);
    let mut b = Optimizer::new(config, 3).unwrap();
    b.restore(a.state().unwrap()).unwrap();
    let mut pb = pa.clone();
    a.step(&mut pa, &[0.3, -0.1, 0.2], 0.1);
    b.step(&mut pb, &[0.3, -0.1, 0.2], 0.1);
    assert_eq!(pa, pb);
    let sgd = Optimizer::new(OptimizerConfig::defaults(OptimizerKind::Sgd), 3).unwrap();
    assert!(
        b.restore(sgd.state().unwrap()).is_err(),
        "an SGD state does not fit Adam"
    );
    assert!(Optimizer::new(
        OptimizerConfig {
            beta1: 1.0,
            ..config
        },
        3
    )
    .is_err());
}

#[test]
fn clipping_and_schedules() {
    let mut g = vec![3.0f32, 4.0];
    assert_eq!(global_norm(&g), 5.0);
    clip_grad_norm(&mut g, 5.0, 10.0);
    assert_eq!(g, [3.0, 4.0]);
    clip_grad_norm(&mut g, 5.0, 1.0);
    let norm = (g[0] * g[0] + g[1] * g[1]).sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    let long: Vec<f32> = (0..10_007)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let exact = long
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    assert!((global_norm(&long) - exact).abs() < 1e-5 * exact);
    assert!(global_norm(&[1.0, f32::NAN]).is_nan() && global_norm(&[f32::INFINITY]).is_infinite());
    assert_eq!(Schedule::constant().lr(0.1, 99), 0.1);
    let warm = Schedule {
        kind: LrSchedule::LinearWarmup,
        warmup: 10,
        total: 0,
    };
    assert!(
        (warm.lr(1.0, 0) - 0.1).abs() < 1e-12 && warm.lr(1.0, 9) == 1.0 && warm.lr(1.0, 500) == 1.0
    );
    let cos = Schedule {
        kind: LrSchedule::Cosine,
        warmup: 10,
        total: 110,
    };
    assert!((cos.lr(1.0, 4) - 0.5).abs() < 1e-12);
    assert!((cos.lr(1.0, 10) - 1.0).abs() < 1e-12);
    assert!((cos.lr(1.0, 60) - 0.5).abs() < 1e-12);
    assert!(cos.lr(1.0, 110).abs() < 1e-12 && cos.lr(1.0, 1000).abs() < 1e-12);
}

/// A buffer large enough to be split across threads gets bit for bit the update of the same
/// values updated in pieces too small to be split.
#[test]
fn adam_on_a_split_buffer_is_bit_identical_to_pieces() {
    let n = 300_001;
    let p0: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
        .collect();
    let grad = |t: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i + 7 * t) * 13 % 29) as f32 - 14.0) / 9.0)
            .collect()
    };
    for kind in [OptimizerKind::Adam, OptimizerKind::Adamw] {
        let config = OptimizerConfig {
            weight_decay: 0.01,
            ..OptimizerConfig::defaults(kind)
        };
        let mut whole = Optimizer::new(config, n).unwrap();
        let cut = n / 2;
        let mut halves = [
            Optimizer::new(config, cut).unwrap(),
            Optimizer::new(config, n - cut).unwrap(),
        ];
        let mut p = p0.clone();
        let mut q = p0.clone();
        for t in 0..3 {
            let g = grad(t);
            whole.step(&mut p, &g, 0.01);
            let (q1, q2) = q.split_at_mut(cut);
            halves[0].step(q1, &g[..cut], 0.01);
            halves[1].step(q2, &g[cut..], 0.01);
        }
        let differ = p
            .iter()
            .zip(&q)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{kind:?}: {differ} values differ");
    }
}
