//! The fused convolutions against candle's composed ops (values and every gradient) and against
//! central differences, across strides, kernels, paddings, output paddings, odd sizes and
//! batch 1.

use candle_core::{DType, Device, Tensor, Var};
use elbo_models::{conv2d, conv2d_masked, ConvSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// candle's ops for the same convolution.
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, s: ConvSpec, relu: bool) -> Tensor {
    let y = if s.transposed {
        x.conv_transpose2d(w, s.padding, s.output_padding, s.stride, 1)
            .unwrap()
    } else {
        x.conv2d(w, s.padding, s.stride, 1, 1).unwrap()
    };
    let y = y
        .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
        .unwrap();
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

/// (batch, in channels, out channels, height, width, kernel, spec)
fn cases() -> Vec<(usize, usize, usize, usize, usize, usize, ConvSpec)> {
    let spec = |stride, padding, output_padding, transposed| ConvSpec {
        stride,
        padding,
        output_padding,
        transposed,
    };
    vec![
        (3, 2, 4, 9, 7, spec(1, 1, 0, false), 3),
        (2, 3, 5, 8, 8, spec(2, 1, 0, false), 4),
        (1, 1, 2, 7, 5, spec(2, 0, 0, false), 3),
        (2, 4, 3, 6, 6, spec(1, 0, 0, false), 1),
        (3, 2, 2, 11, 9, spec(2, 2, 0, false), 4),
        (3, 3, 2, 4, 4, spec(2, 1, 0, true), 4),
        (1, 2, 3, 5, 3, spec(2, 1, 1, true), 3),
        (2, 4, 2, 3, 5, spec(1, 1, 0, true), 3),
        (2, 3, 3, 4, 4, spec(1, 0, 0, true), 1),
        (1, 2, 1, 3, 3, spec(3, 0, 2, true), 4),
        (1, 2, 2, 1, 1, spec(2, 2, 1, true), 4),
        // Window rows 8, 14 and 16 wide (copied as fixed-size arrays).
        (1, 2, 3, 16, 16, spec(2, 1, 0, false), 4),
        (1, 2, 2, 14, 14, spec(2, 1, 0, true), 4),
        (1, 1, 2, 16, 16, spec(1, 1, 0, false), 3),
        // The last input row and column are read by no window.
        (2, 2, 3, 8, 6, spec(2, 0, 0, false), 3),
        // The output padding reaches past the last phase row.
        (1, 2, 2, 3, 4, spec(2, 0, 1, true), 4),
        // Batches of many images per thread, on the VQ models' grid sizes: several images'
        // windows side by side in one gemm, the last group of a thread shorter.
        (47, 2, 3, 7, 7, spec(1, 1, 0, false), 3),
        (41, 3, 2, 4, 4, spec(2, 1, 0, true), 4),
        (29, 2, 3, 7, 7, spec(1, 1, 0, true), 3),
        (13, 2, 3, 7, 7, spec(1, 0, 0, false), 1),
        (13, 2, 2, 28, 28, spec(2, 1, 0, false), 4),
    ]
    .into_iter()
    .map(|(n, cin, cout, h, w, s, k)| (n, cin, cout, h, w, k, s))
    .collect()
}

/// Random x, W and b for a case, as variables.
fn operands(
    (n, cin, cout, h, w, k, spec): (usize, usize, usize, usize, usize, usize, ConvSpec),
    rng: &mut ChaCha8Rng,
) -> (Var, Var, Var) {
    let wshape = if spec.transposed {
        [cin, cout, k, k]
    } else {
        [cout, cin, k, k]
    };
    (
        Var::from_tensor(&random(&[n, cin, h, w], rng)).unwrap(),
        Var::from_tensor(&random(&wshape, rng)).unwrap(),
        Var::from_tensor(&random(&[cout], rng)).unwrap(),
    )
}

/// The gradients of Σ y·r.
fn grads_of(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (y * r).unwrap().sum_all().unwrap().backward().unwrap()
}

fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn fused_convolutions_match_candles_ops_and_their_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for case in cases() {
        let (n, cin, cout, h, w, k, spec) = case;
        for relu in [false, true] {
            let what = format!("{n}×{cin}×{h}×{w}, {cout} out, k {k}, {spec:?}, relu {relu}");
            let (x, wt, b) = operands(case, &mut rng);
            let fused = conv2d(&x, &wt, &b, spec, relu).unwrap();
            let reference = composed(&x, &wt, &b, spec, relu);
            assert!(max_gap(&reference, &fused) < 1e-5, "{what}: values");
            let r = random(fused.dims(), &mut rng);
            let (gf, gr) = (grads_of(&fused, &r), grads_of(&reference, &r));
            for (name, v) in [("x", &x), ("W", &wt), ("b", &b)] {
                let (a, c) = (gr.get(v).unwrap(), gf.get(v).unwrap());
                assert!(max_gap(a, c) < 1e-4, "{what}: gradient of {name}");
            }
        }
    }
}

/// A masked convolution reads only the kept taps: the values and gradients of candle's
/// convolution with the weight multiplied by the mask, on the fused path (f32) and the composed
/// one (f64), and a zero weight gradient at every dropped tap.
#[test]
fn masked_convolutions_match_the_weight_times_the_mask() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, cin, cout, side, k, stride, padding) in [
        (3, 2, 4, 5, 3, 1, 1),
        (1, 3, 2, 7, 5, 1, 2),
        (2, 2, 3, 6, 3, 2, 1),
        (2, 1, 2, 4, 1, 1, 0),
        (37, 3, 4, 7, 3, 1, 1),
    ] {
        let spec = ConvSpec {
            stride,
            padding,
            output_padding: 0,
            transposed: false,
        };
        let k2 = k * k;
        for taps in [
            (1u128 << k2) - 1,
            rng.random_range(1..(1u128 << k2)),
            1 << (k2 / 2),
        ] {
            let mask: Vec<f32> = (0..k2)
                .map(|t| f32::from(u8::from(taps & (1 << t) != 0)))
                .collect();
            let mask = Tensor::from_vec(mask, (1, 1, k, k), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::F64] {
                let what =
                    format!("{n}×{cin}×{side}², {cout} out, k {k}, taps {taps:b}, {dtype:?}");
                let (x, wt, b) = operands((n, cin, cout, side, side, k, spec), &mut rng);
                let cast = |v: &Var| Var::from_tensor(&v.to_dtype(dtype).unwrap()).unwrap();
                let (x, wt, b) = (cast(&x), cast(&wt), cast(&b));
                let masked = conv2d_masked(&x, &wt, &b, spec, taps).unwrap();
                let m = mask.to_dtype(dtype).unwrap();
                let reference = composed(&x, &wt.broadcast_mul(&m).unwrap(), &b, spec, false);
                assert!(max_gap(&reference, &masked) < 1e-5, "{what}: values");
                let r = random(masked.dims(), &mut rng).to_dtype(dtype).unwrap();
                let (gm, gr) = (grads_of(&masked, &r), grads_of(&reference, &r));
                for (name, v) in [("x", &x), ("W", &wt), ("b", &b)] {
                    let (a, c) = (gr.get(v).unwrap(), gm.get(v).unwrap());
                    assert!(max_gap(a, c) < 1e-4, "{what}: gradient of {name}");
                }
                let dw = gm.get(&wt).unwrap().to_dtype(DType::F32).unwrap();
                let dropped = dw
                    .broadcast_mul(&(1.0 - &mask).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(
                    dropped, 0.0,
                    "{what}: a dropped tap's weight has a gradient"
                );
            }
        }
    }
    let spec = ConvSpec {
        stride: 2,
        padding: 1,
        output_padding: 0,
        transposed: true,
    };
    let (x, wt, b) = operands((1, 2, 2, 3, 3, 4, spec), &mut rng);
    let err = conv2d_masked(&x, &wt, &b, spec, 1).unwrap_err().to_string();
    assert!(err.contains("not transposed"), "{err}");
}

/// Off the fused path (here: in f64 on the CPU; on a GPU in any dtype) a convolution is composed
/// of candle's `conv2d` with hand-written gradients, transposed convolutions by phases: the same
/// values and gradients as candle's `conv2d` / `conv_transpose2d` and their own backward passes.
#[test]
fn gemm_convolutions_match_candles_ops_and_their_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let f64_var = |v: &Var| Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap();
    let gap64 = |a: &Tensor, b: &Tensor| -> f64 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap()
    };
    for case in cases() {
        let (n, cin, cout, h, w, k, spec) = case;
        for (relu, data) in [(false, false), (true, false), (true, true)] {
            let what = format!("{n}×{cin}×{h}×{w}, {cout} out, k {k}, {spec:?}, relu {relu}");
            let (x, wt, b) = operands(case, &mut rng);
            let (x, wt, b) = (f64_var(&x), f64_var(&wt), f64_var(&b));
            // As data, x gets no gradient.
            let input = if data {
                x.as_tensor().detach()
            } else {
                x.as_tensor().clone()
            };
            let gemm = conv2d(&input, &wt, &b, spec, relu).unwrap();
            let reference = composed(&input, &wt, &b, spec, relu);
            assert_eq!(gemm.dtype(), DType::F64);
            assert!(gap64(&reference, &gemm) < 1e-12, "{what}: values");
            let r = random(gemm.dims(), &mut rng).to_dtype(DType::F64).unwrap();
            let (gg, gr) = (grads_of(&gemm, &r), grads_of(&reference, &r));
            for (name, v) in [("W", &wt), ("b", &b)] {
                let (a, c) = (gr.get(v).unwrap(), gg.get(v).unwrap());
                assert!(gap64(a, c) < 1e-10, "{what}: gradient of {name}");
            }
            match (data, gg.get(&x)) {
                (true, None) => {}
                (false, Some(dx)) => assert!(
                    gap64(gr.get(&x).unwrap(), dx) < 1e-10,
                    "{what}: gradient of x"
                ),
                (_, got) => panic!("{what}: data {data}, gradient of x {}", got.is_some()),
            }
        }
    }
}

/// Σ y·r is linear in each of x, W and b, so central differences are exact up to rounding.
#[test]
fn fused_convolution_gradients_match_central_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for case in cases() {
        let (n, cin, cout, h, w, k, spec) = case;
        let what = format!("{n}×{cin}×{h}×{w}, {cout} out, k {k}, {spec:?}");
        let (x, wt, b) = operands(case, &mut rng);
        let y = conv2d(&x, &wt, &b, spec, false).unwrap();
        let r = random(y.dims(), &mut rng);
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            let y = conv2d(x, w, b, spec, false).unwrap();
            f64::from(
                (&y * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
        };
        let grads = grads_of(&y, &r);
        for which in 0..3 {
            let var = [&x, &wt, &b][which];
            let g = grads.get(var).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            let base = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in (0..base.len()).step_by((base.len() / 7).max(1)) {
                let eps = 0.05f32;
                let probe = |d: f32| {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                    match which {
                        0 => loss(&t, &wt, &b),
                        1 => loss(&x, &t, &b),
                        _ => loss(&x, &wt, &t),
                    }
                };
                let fd = (probe(eps) - probe(-eps)) / (2.0 * f64::from(eps));
                assert!(
                    (fd - f64::from(g[i])).abs() <= 2e-3 * (1.0 + fd.abs()),
                    "{what}: input {which}, index {i}: analytic {} vs central difference {fd}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn shapes_that_do_not_fit_are_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let spec = ConvSpec {
        stride: 1,
        padding: 0,
        output_padding: 0,
        transposed: false,
    };
    let x = random(&[1, 2, 3, 3], &mut rng);
    let b = random(&[4], &mut rng);
    for (w, s) in [
        (random(&[4, 3, 3, 3], &mut rng), spec),
        (random(&[4, 2, 5, 5], &mut rng), spec),
        (random(&[4, 2, 3, 2], &mut rng), spec),
        (
            random(&[4, 2, 3, 3], &mut rng),
            ConvSpec { stride: 0, ..spec },
        ),
        (
            random(&[2, 4, 3, 3], &mut rng),
            ConvSpec {
                transposed: true,
                output_padding: 1,
                ..spec
            },
        ),
    ] {
        let err = conv2d(&x, &w, &b, s, false).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{w:?} {s:?}: {err}");
    }
    // No channels in or out: refused, not a panic.
    let none = random(&[0], &mut rng);
    let err = conv2d(&x, &random(&[0, 2, 3, 3], &mut rng), &none, spec, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
    let empty = random(&[1, 0, 3, 3], &mut rng);
    let err = conv2d(&empty, &random(&[4, 0, 3, 3], &mut rng), &b, spec, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
}

/// The VQ-VAE residual block, `x + conv₁ₓ₁(ReLU(conv₃ₓ₃(ReLU(x))))`, against candle's ops with
/// the same parameters: values and the gradients of x and every parameter, odd sizes and batch 1.
#[test]
fn residual_blocks_match_candles_ops_and_their_gradients() {
    use elbo_models::{Params, ResidualBlock};
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, c, hidden, h, w) in [(2, 4, 5, 7, 6), (1, 3, 8, 8, 8), (3, 2, 2, 5, 9)] {
        let what = format!("{n}×{c}×{h}×{w}, hidden {hidden}");
        let mut params = Params::new(&Device::Cpu, 7);
        let block = ResidualBlock::new(&mut params, "res", c, hidden).unwrap();
        let vars = params.vars();
        assert_eq!(
            vars.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "res.conv1.bias",
                "res.conv1.weight",
                "res.conv3.bias",
                "res.conv3.weight"
            ]
        );
        let x = Var::from_tensor(&random(&[n, c, h, w], &mut rng)).unwrap();
        let y = block.forward(&x).unwrap();
        let conv = |x: &Tensor, layer: &str, pad: usize| {
            let b = &vars[&format!("{layer}.bias")];
            x.conv2d(&vars[&format!("{layer}.weight")], pad, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                .unwrap()
        };
        let inner = conv(&x.relu().unwrap(), "res.conv3", 1).relu().unwrap();
        let reference = (x.as_tensor() + conv(&inner, "res.conv1", 0)).unwrap();
        assert_eq!(y.dims(), [n, c, h, w], "{what}");
        assert!(max_gap(&reference, &y) < 1e-5, "{what}: values");
        let r = random(y.dims(), &mut rng);
        let (gy, gr) = (grads_of(&y, &r), grads_of(&reference, &r));
        for (name, v) in vars.iter().map(|(k, v)| (k.as_str(), v)).chain([("x", &x)]) {
            let (a, b) = (gr.get(v).unwrap(), gy.get(v).unwrap());
            assert!(max_gap(a, b) < 1e-4, "{what}: gradient of {name}");
        }
    }
}

#[test]
fn residual_blocks_need_channels() {
    use elbo_models::{Params, ResidualBlock};
    let mut params = Params::new(&Device::Cpu, 0);
    for (c, hidden) in [(0, 4), (4, 0)] {
        let err = ResidualBlock::new(&mut params, "res", c, hidden).unwrap_err();
        assert!(err.to_string().contains("residual block"), "{err}");
    }
}
