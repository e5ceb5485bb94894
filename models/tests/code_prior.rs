//! The prior over VQ codes: the PixelCNN's masks leak no later position and leave no blind
//! spot, its likelihood is normalised over every grid, its draws follow it, its gradients match
//! finite differences, and the prior refuses a base it cannot read.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use elbo_models::{
    gated_tanh, Activation, Architecture, CodeGrid, CodePrior, CodePriorConfig, Input,
    LikelihoodKind, Model, ModelSpec, Noise, Objective, Params, PixelCnn, StepContext, Vae, VqVae,
    VqVaeConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn grid(codes: usize, height: usize, width: usize) -> CodeGrid {
    CodeGrid {
        codes,
        height,
        width,
    }
}

fn pixel_cnn(
    g: CodeGrid,
    condition: Option<(usize, usize)>,
    (channels, layers): (usize, usize),
) -> (Params, PixelCnn) {
    let mut params = Params::new(&Device::Cpu, 5);
    let net = PixelCnn::new(&mut params, "prior", g, condition, (channels, layers, 3)).unwrap();
    (params, net)
}

/// Every code grid of `positions` positions over `k` codes, row-major, one after another.
fn every_grid(k: u32, positions: u32) -> (Vec<u32>, usize) {
    let n = k.pow(positions) as usize;
    let mut codes = Vec::with_capacity(n * positions as usize);
    for i in 0..n as u32 {
        codes.extend((0..positions).map(|p| (i / k.pow(p)) % k));
    }
    (codes, n)
}

#[test]
fn an_output_depends_on_every_earlier_position_and_no_later_one() {
    // Sixteen channels, so that the head's ReLUs leave every output some live path.
    let (h, w, c) = (4, 4, 16);
    // Four layers of 3×3 reach four rows up and four columns across: all of a 4×4 grid.
    let (_params, net) = pixel_cnn(grid(5, h, w), None, (c, 4));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let values: Vec<f32> = (0..c * h * w)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let x =
        Var::from_tensor(&Tensor::from_vec(values, (1, c, h, w), &Device::Cpu).unwrap()).unwrap();
    let logits = net.forward_embedded(x.as_tensor(), None).unwrap();
    for i in 0..h * w {
        let (y, xx) = (i / w, i % w);
        let out = logits
            .narrow(2, y, 1)
            .unwrap()
            .narrow(3, xx, 1)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = out.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("the input reaches the output");
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..h * w {
            let reach = (0..c)
                .map(|ch| g[ch * h * w + j].abs())
                .fold(0f32, f32::max);
            if j >= i {
                assert_eq!(reach, 0.0, "output {i} reads input {j}, at or after it");
            } else {
                assert!(
                    reach > 0.0,
                    "output {i} never reads earlier input {j}: a blind spot"
                );
            }
        }
    }
}

#[test]
fn the_likelihood_sums_to_one_over_every_grid() {
    let g = grid(3, 2, 2);
    let (every, n) = every_grid(3, 4);
    let (_p, net) = pixel_cnn(g, None, (4, 3));
    let total: f64 = net
        .nll(&every, None, n)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|nll| (-f64::from(*nll)).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-5, "Σ p(grid) = {total}");

    // Conditioned on a coarser 1×1 grid of 2 codes, upsampled ×2: normalised for each.
    let (_p, conditional) = pixel_cnn(g, Some((2, 2)), (4, 3));
    let mut totals = Vec::new();
    for top in 0..2u32 {
        let condition = vec![top; n];
        let p: f64 = conditional
            .nll(&every, Some(&condition), n)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|nll| (-f64::from(*nll)).exp())
            .sum();
        assert!((p - 1.0).abs() < 1e-5, "Σ p(grid | top {top}) = {p}");
        totals.push(
            conditional
                .nll(&every[..4], Some(&condition[..1]), 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
        );
    }
    assert_ne!(totals[0], totals[1], "the condition changes the likelihood");
}

#[test]
fn draws_follow_the_likelihood() {
    let g = grid(2, 1, 2);
    let (every, n) = every_grid(2, 2);
    let (_p, net) = pixel_cnn(g, None, (4, 2));
    let p: Vec<f64> = net
        .nll(&every, None, n)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|nll| (-f64::from(*nll)).exp())
        .collect();
    let draws = 4000;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let drawn = net.draw(None, draws, &mut rng).unwrap();
    let mut counts = [0f64; 4];
    for pair in drawn.chunks(2) {
        counts[(pair[0] + 2 * pair[1]) as usize] += 1.0;
    }
    for (grid, (count, p)) in counts.iter().zip(&p).enumerate() {
        let se = (p * (1.0 - p) / draws as f64).sqrt();
        let freq = count / draws as f64;
        assert!(
            (freq - p).abs() < 4.0 * se,
            "grid {grid}: drawn {freq:.4}, likelihood {p:.4} (se {se:.4})"
        );
    }
}

#[test]
fn bad_codes_are_refused() {
    let (_p, net) = pixel_cnn(grid(3, 2, 2), None, (4, 1));
    let err = net.nll(&[0, 1, 2], None, 1).unwrap_err().to_string();
    assert!(err.contains("3 values, expected 4"), "{err}");
    let err = net.nll(&[0, 1, 2, 3], None, 1).unwrap_err().to_string();
    assert!(err.contains("code 3, expected codes below 3"), "{err}");
    let err = net
        .nll(&[0, 1, 2, 0], Some(&[0]), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("condition"), "{err}");
}

fn vq_spec() -> ModelSpec {
    ModelSpec {
        input_shape: vec![1, 8, 8],
        latent_dim: 3,
        architecture: Architecture::Conv,
        hidden: vec![16],
        activation: Activation::Relu,
        likelihood: LikelihoodKind::Bernoulli,
        variance: 0.1,
        log_var_clamp: 10.0,
        objective: Objective::default(),
    }
}

fn vq(levels: usize) -> Box<dyn Model> {
    let config = VqVaeConfig {
        codes: 6,
        channels: vec![3],
        residual_blocks: 1,
        residual_hidden: 2,
        ..VqVaeConfig::default()
    };
    Box::new(VqVae::new(&vq_spec(), config, levels, &Device::Cpu, 2).unwrap())
}

fn prior_config() -> CodePriorConfig {
    CodePriorConfig {
        vq_run: "runs/vq".into(),
        channels: 4,
        layers: 2,
        kernel: 3,
    }
}

fn data(rows: usize) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let v: Vec<f32> = (0..rows * 64).map(|_| rng.random_range(0.0..1.0)).collect();
    Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap()
}

fn loss(prior: &CodePrior, x: &Tensor) -> Tensor {
    let ids: Vec<u64> = (0..x.dim(0).unwrap() as u64).collect();
    let labels = vec![None; ids.len()];
    let noise = Noise::new(1);
    let input = Input {
        x,
        labels: &labels,
        ids: &ids,
    };
    let ctx = StepContext {
        step: 0,
        noise: &noise,
        global_rows: ids.len() as u64,
        batch_stats: &[],
    };
    prior.loss(&input, &ctx).unwrap().loss
}

#[test]
fn prior_gradients_match_finite_differences_over_one_and_two_grids() {
    let x = data(3);
    for levels in [1, 2] {
        let prior =
            CodePrior::new(&vq_spec(), &prior_config(), vq(levels), &Device::Cpu, 7).unwrap();
        assert_eq!(
            prior
                .params()
                .vars()
                .keys()
                .any(|k| k.contains("condition")),
            levels == 2,
            "only the finer grid of two is conditioned"
        );
        let checked = common::check_gradients(
            prior.params(),
            || loss(&prior, &x),
            |_| true,
            2,
            (2e-3, 2e-2),
        );
        assert!(checked > 20, "{checked} entries checked");
        let terms = prior.statistics().terms;
        assert_eq!(terms.len(), if levels == 1 { 2 } else { 4 }, "{terms:?}");
        let drawn = prior.sample(3, 1, None, &Device::Cpu).unwrap();
        assert_eq!(drawn.dims(), &[3, 64]);
    }
}

#[test]
fn a_prior_refuses_a_base_it_cannot_read() {
    let vae = Vae::new(
        ModelSpec {
            architecture: Architecture::Mlp,
            latent_dim: 2,
            ..vq_spec()
        },
        &Device::Cpu,
        0,
    )
    .unwrap();
    let err = CodePrior::new(&vq_spec(), &prior_config(), Box::new(vae), &Device::Cpu, 0)
        .err()
        .expect("a VAE has no code grids")
        .to_string();
    assert!(
        err.contains("model.code_prior.vq_run") && err.contains("no code grids"),
        "{err}"
    );
    let other = ModelSpec {
        input_shape: vec![1, 16, 16],
        ..vq_spec()
    };
    let err = CodePrior::new(&other, &prior_config(), vq(1), &Device::Cpu, 0)
        .err()
        .expect("different examples")
        .to_string();
    assert!(err.contains("64 values") && err.contains("256"), "{err}");
}

#[test]
fn the_fused_gate_matches_tanh_times_sigmoid_and_its_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let values: Vec<f32> = (0..2 * 6 * 3 * 3)
        .map(|_| rng.random_range(-6.0..6.0))
        .collect();
    let x =
        Var::from_tensor(&Tensor::from_vec(values, (2, 6, 3, 3), &Device::Cpu).unwrap()).unwrap();
    let composed = |x: &Tensor| {
        let a = x.narrow(1, 0, 3).unwrap().tanh().unwrap();
        let b = candle_nn::ops::sigmoid(&x.narrow(1, 3, 3).unwrap()).unwrap();
        (a * b).unwrap()
    };
    let r = Tensor::from_vec(
        (0..2 * 3 * 9)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<_>>(),
        (2, 3, 3, 3),
        &Device::Cpu,
    )
    .unwrap();
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let reference = composed(x64.as_tensor());
    let grad_of = |y: &Tensor, v: &Var| {
        let r = r.to_dtype(y.dtype()).unwrap();
        let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        g.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    };
    let want = grad_of(&reference, &x64);
    for (what, y, v) in [
        ("fused f32", gated_tanh(x.as_tensor()).unwrap(), &x),
        ("composed f64", gated_tanh(x64.as_tensor()).unwrap(), &x64),
    ] {
        let got: Vec<f64> = y
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expect: Vec<f64> = reference.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-6, "{what}: {a} vs {b}");
        }
        for (a, b) in grad_of(&y, v).iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{what} gradient: {a} vs {b}");
        }
    }
    let odd = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = gated_tanh(&odd).unwrap_err().to_string();
    assert!(err.contains("even channel count"), "{err}");
}
