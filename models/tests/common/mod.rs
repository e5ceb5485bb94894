//! Helpers shared by the model tests.

use candle_core::{Device, Tensor};
use elbo_models::Params;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Checks autograd's gradient of `loss` against central finite differences (step 1e-2) at
/// `per_param` random entries of every parameter whose name `check` accepts (a parameter
/// without a gradient has gradient 0): `|fd − autograd| ≤ abs + rel·|autograd|`. Returns how
/// many entries were checked.
pub fn check_gradients(
    params: &Params,
    loss: impl Fn() -> Tensor,
    check: impl Fn(&str) -> bool,
    per_param: usize,
    (abs, rel): (f64, f64),
) -> usize {
    let grads = loss().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut checked = 0;
    for (name, var) in params.vars().iter().filter(|(n, _)| check(n)) {
        let analytic = grads.get(var.as_tensor()).map(flat);
        let base = flat(var.as_tensor());
        let set = |v: Vec<f32>| {
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap()
        };
        for _ in 0..per_param {
            let i = rng.random_range(0..base.len());
            let h = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                set(v);
                f64::from(loss().to_scalar::<f32>().unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
            set(base.clone());
            let an = analytic.as_ref().map_or(0.0, |g| f64::from(g[i]));
            assert!(
                (fd - an).abs() <= abs + rel * an.abs(),
                "{name}[{i}]: finite difference {fd} vs autograd {an}"
            );
            checked += 1;
        }
    }
    checked
}
