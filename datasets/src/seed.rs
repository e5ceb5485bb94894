//! Seed derivation: independent, reproducible RNG streams from the run seed.

/// SplitMix64 finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed for the stream named by `path` (e.g. `[purpose, epoch, index]`) under `seed`.
/// Distinct paths give unrelated seeds; the same path always gives the same seed.
pub fn derive_seed(seed: u64, path: &[u64]) -> u64 {
    path.iter()
        .fold(mix(seed ^ 0x6a09_e667_f3bc_c908), |acc, &p| {
            mix(acc ^ mix(p.wrapping_add(0x9e37_79b9_7f4a_7c15)))
        })
}
