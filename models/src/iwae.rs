//! Evaluation: the importance-weighted bound (Burda et al. 2015) and active units.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::Result;

/// Per-example IWAE bound `log (1/k) Σ_s w_s` with k samples of a batch of `b` examples — an
/// estimate of log p(x) that tightens as k grows (k = 1 is the ELBO). `log_weights` gives the
/// (S, B) log-weights of a range of samples; they are asked for in groups of at most
/// `max_rows` (samples × batch) rows, so k = 1000 fits in memory.
pub fn iw_bound(
    b: usize,
    k: usize,
    max_rows: usize,
    log_weights: impl Fn(Range<usize>) -> Result<Tensor>,
) -> Result<Vec<f64>> {
    let per_group = (max_rows / b.max(1)).clamp(1, k.max(1));
    let mut log_w: Vec<Vec<f32>> = vec![Vec::with_capacity(k); b];
    let mut start = 0;
    while start < k {
        let end = (start + per_group).min(k);
        let w = log_weights(start..end)?.t()?.to_vec2::<f32>()?; // (B, S)
        for (acc, row) in log_w.iter_mut().zip(w) {
            acc.extend(row);
        }
        start = end;
    }
    Ok(log_w
        .iter()
        .map(|w| {
            let m = w.iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v)) as f64;
            m + w.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() - (k as f64).ln()
        })
        .collect())
}

/// Running statistics of posterior means, for counting active units: a latent dimension is
/// active when the variance of E_q[z_u|x] over the data exceeds 0.01 (Burda et al. 2015).
#[derive(Debug, Clone, Default)]
pub struct ActiveUnits {
    n: u64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl ActiveUnits {
    /// Adds a batch of posterior means (B, d).
    pub fn add(&mut self, means: &Tensor) -> Result<()> {
        for row in means.to_vec2::<f32>()? {
            if self.sum.is_empty() {
                self.sum = vec![0.0; row.len()];
                self.sum_sq = vec![0.0; row.len()];
            }
            for (j, v) in row.iter().enumerate() {
                self.sum[j] += *v as f64;
                self.sum_sq[j] += (*v as f64) * (*v as f64);
            }
            self.n += 1;
        }
        Ok(())
    }

    /// Variance of each dimension's posterior mean.
    pub fn variances(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(s, q)| q / n - (s / n) * (s / n))
            .collect()
    }

    /// Dimensions whose variance exceeds `threshold` (0.01 in the literature).
    pub fn count(&self, threshold: f64) -> usize {
        self.variances().iter().filter(|v| **v > threshold).count()
    }
}
