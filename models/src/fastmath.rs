//! Branch-free `exp` and `ln` for f32 (Cephes' polynomials, within 2 ulp of libm) that the
//! compiler vectorizes inside a kernel: libm's `expf`/`logf` are calls, one element at a time,
//! and the likelihood kernels spent most of their time in them.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND: f32 = 12_582_912.0;

/// `e^x`; inputs are clamped to [−87.3, 88], so the result is positive and finite (about
/// 1.2e−38 to 1.7e38).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest by adding and removing 1.5·2²³ (no `floor`, which is a call without
    // SSE4.1).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ: `shifted` holds n (−126 to 127) in its low mantissa bits, so its bits less those of
    // 1.5·2²³ are n as an integer — integer arithmetic only (a saturating `as i32` would add a
    // range and NaN check per element and keep the loop from vectorizing).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `ln x` for a positive normal `x` (the only inputs it is given).
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) as i32 - 127) as f32;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    // Keep the mantissa in [√½, √2) so the polynomial's argument is small.
    let big = m > std::f32::consts::SQRT_2;
    let (m, e) = if big { (m * 0.5, e + 1.0) } else { (m, e) };
    let f = m - 1.0;
    let z = f * f;
    let p = 7.037_683_6e-2_f32;
    let p = p * f - 1.151_461e-1;
    let p = p * f + 1.167_699_9e-1;
    let p = p * f - 1.242_014_1e-1;
    let p = p * f + 1.424_932_3e-1;
    let p = p * f - 1.666_805_8e-1;
    let p = p * f + 2.000_071_4e-1;
    let p = p * f - 2.499_999_4e-1;
    let p = p * f + 3.333_333e-1;
    let y = p * f * z + LN2_LO * e - 0.5 * z;
    f + y + LN2_HI * e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = 0;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3;
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e4) > 0.0 && exp(-1e4) < 1.3e-38);
        assert!(exp(1e4).is_finite() && exp(1e4) > 1.6e38);
    }

    #[test]
    fn ln_matches_libm_within_two_ulp() {
        let mut worst = 0;
        let mut x = 1.2e-38_f32;
        while x < 3e38 {
            worst = worst.max(ulps(ln(x), x.ln()));
            x *= 1.000_37;
        }
        for i in 0..=100_000 {
            let x = 1.0 + i as f32 * 1e-5;
            worst = worst.max(ulps(ln(x), x.ln()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
    }
}
