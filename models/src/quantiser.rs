//! A vector quantiser: a codebook of K codes of dimension D, the nearest code per grid position,
//! the straight-through gradient, and the codebook's EMA state with dead-code restarts —
//! updated from statistics that are sums over rows, so that the sums of N ranks are the sums of
//! one process.
//!
//! **Quantiser.** Each position's nearest code by squared distance; a row's code never depends
//! on the rows beside it. On the CPU (the fused form, [`crate::forms`], for any dtype) the
//! search runs row by row on the host, exact in f32, ties going to the lowest index; elsewhere
//! (the composed form, the one a GPU runs) it stays on the batch's device as
//! `argmin_k ‖e_k‖² − 2 z·e_k`, one matrix product, where near-ties may resolve the other way;
//! the one-hot counts and sums of the EMA update are computed there too. Straight-through: the
//! decoder reads `z_e + sg(e − z_e)`, so `∂/∂z_e` is the identity.
//!
//! **EMA codebook** (non-gradient state in [`Buffers`]): each step's one-hot counts `n_i` and
//! sums `s_i` of the encoder outputs assigned to code i are update statistics — summed across
//! ranks in the all-reduce that carries the gradients — and every replica then updates
//! `N_i ← γN_i + (1−γ)n_i`, `m_i ← γm_i + (1−γ)s_i` and `e_i = m_i / Ñ_i` with the
//! Laplace-smoothed `Ñ_i = (N_i + ε)/(ΣN + Kε)·ΣN`. N starts at 1 and m at the initial codebook
//! (Jukebox's start: an unused code keeps its place instead of jumping to m/ε). With the
//! codebook loss instead, the codebook is a parameter and N only tracks usage.
//!
//! **Dead-code restart.** A code whose `N_i` is below the restart threshold before a step is
//! replaced by one encoder output of that step's *global* batch, and its statistics reset
//! (`N_i` = the threshold, `m_i = N_i·e_i`). The choice is a function of the run seed, the
//! step and each output's (row id, position) only: every output holds a seeded draw for each
//! of [`RESTART_SLOTS`] slots of each code, an output is a slot's candidate with probability
//! 1/(outputs in the global batch), and a slot with exactly one candidate names it — counts
//! and sums of the candidates ride in the same all-reduce, so every rank, at any world size,
//! restarts the same codes with the same vectors. A code whose slots all miss (about 16% of
//! steps) waits for the next step.
//!
//! **k-means initialisation** (`init = "kmeans"`, EMA codebook). The first applied step of a
//! run starts the codebook from k-means on the encoder outputs of its *global* batch, in rounds
//! of batch statistics ([`crate::Model::batch_rounds`]) that are sums over rows, so any world
//! size computes the same centroids: a seeding round (every code has [`SEED_SLOTS`] slots and an
//! output is a slot's candidate with probability 1/(outputs in the global batch), drawn as for
//! restarts from their own stream; a code takes its first slot with exactly one candidate, else
//! the mean of its nonempty slot with the fewest, else keeps its initial vector), then
//! `kmeans_iterations` Lloyd rounds (each output's nearest centroid, the global counts and sums,
//! a centroid with no outputs stays where it was). The step trains with the centroids; its EMA
//! update first starts the statistics as any codebook's start (`N_i = 1`, `m_i` = the mean of
//! the step's outputs assigned to code i: one more Lloyd step; a code with none keeps its
//! vector), then takes the ordinary EMA step, without restarts. (Starting `N_i` at the first
//! batch's counts instead keeps codes the drifting encoder no longer uses "alive" for ~400
//! steps at γ 0.99, measured: perplexity fell to 19 before they were restarted.) A buffer
//! `{name}.kmeans_pending` (1 until then) makes the rounds a function of the replicated state,
//! not of the step: a skipped step leaves it pending, a resumed run does not repeat it.

use std::borrow::Cow;

use candle_core::{DType, Tensor};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::buffers::Buffers;
use crate::cpu::lane_sum_zip;
use crate::error::{ModelError, Result};
use crate::forms::fused_on;
use crate::model::StepContext;
use crate::noise::Purpose;
use crate::params::Params;

/// Candidate slots per code for a restart (see the module docs).
pub const RESTART_SLOTS: usize = 4;

/// Candidate slots per code when k-means seeds the codebook (see the module docs): a code
/// finds no candidate in any of them with probability e⁻⁸ ≈ 3·10⁻⁴.
pub const SEED_SLOTS: usize = 8;

/// How a codebook starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodebookInit {
    /// Uniform ±√(3/D) plus the offset (sonnet's variance scaling).
    Uniform,
    /// k-means on the encoder outputs of the first applied step's global batch.
    Kmeans,
}

/// How a codebook learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodebookLearning {
    /// Exponential moving averages of the assigned outputs (the paper's appendix; sonnet's
    /// `VectorQuantizerEMA`).
    Ema,
    /// A codebook parameter trained by the codebook loss `‖sg(z_e) − e‖²`.
    Loss,
}

/// How a quantiser's codebook learns and restarts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CodebookSettings {
    pub learning: CodebookLearning,
    pub decay: f64,
    pub epsilon: f64,
    /// 0: no restarts.
    pub restart_threshold: f64,
    /// Added to every initial code.
    pub init_offset: f64,
    /// How the codebook starts.
    pub init: CodebookInit,
    /// Lloyd rounds of the k-means initialisation.
    pub kmeans_iterations: usize,
}

/// Index of the nearest code of each `dim`-long row of `z` among the rows of `codebook`, by
/// squared Euclidean distance; ties go to the lowest index. Each row is computed alone, so
/// its code does not depend on the rows beside it (or on how a batch was split).
pub fn nearest_codes(z: &[f32], codebook: &[f32], dim: usize) -> Vec<u32> {
    z.par_chunks(dim.max(1) * 64)
        .flat_map_iter(|rows| {
            rows.chunks_exact(dim).map(|row| {
                let mut best = (f32::INFINITY, 0u32);
                for (k, code) in codebook.chunks_exact(dim).enumerate() {
                    let d = squared_distance(row, code);
                    if d < best.0 {
                        best = (d, k as u32);
                    }
                }
                best.1
            })
        })
        .collect()
}

/// The composed form of [`nearest_codes`], on the rows' device: the index (u32) of the nearest
/// row of `codebook` (K, D) to each of the detached `rows` (N, D), as
/// `argmin_k ‖e_k‖² − 2 z·e_k` (`‖z‖²` is the same for every code of a row).
fn nearest_codes_composed(rows: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let book = codebook.detach().to_dtype(rows.dtype())?;
    let norms = book.sqr()?.sum(1)?.unsqueeze(0)?;
    let dots = rows.matmul(&book.t()?)?;
    Ok(dots.affine(-2.0, 0.0)?.broadcast_add(&norms)?.argmin(1)?)
}

/// `‖a − b‖²`, summed in eight lanes (vectorised; the order is fixed, so a row's distance
/// depends on the row alone).
#[inline]
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    lane_sum_zip(a, b, |x, y| (x - y) * (x - y))
}

/// exp(entropy) of the distribution proportional to `counts` (0 when they are all 0).
pub(crate) fn perplexity(counts: &[f64]) -> f64 {
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|c| **c > 0.0)
        .map(|c| {
            let p = c / total;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// The encoder outputs `z_e` (B, D, h, w) as rows of D, one per position: (B·h·w, D).
fn positions(z_e: &Tensor) -> Result<Tensor> {
    let (b, d, gh, gw) = z_e.dims4()?;
    Ok(z_e
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((b * gh * gw, d))?)
}

/// A tensor's values on the host, as f32, row-major.
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Adds each output's one-hot count to `stats[..codes]` and, with `sums`, its vector to its
/// code's sum in `stats[codes..codes + codes·dim]`.
fn add_assignments(
    stats: &mut [f32],
    codes: usize,
    (indices, z, dim): (&[u32], &[f32], usize),
    sums: bool,
) {
    for (row, &i) in z.chunks_exact(dim).zip(indices) {
        let i = i as usize;
        stats[i] += 1.0;
        if sums {
            for (s, v) in stats[codes + i * dim..][..dim].iter_mut().zip(row) {
                *s += v;
            }
        }
    }
}

/// One EMA step of a codebook from a step's global one-hot `counts` (K) and `sums` (K·D):
/// updates `count` and `sum` in place and returns the codebook `m_i / Ñ_i` with
/// Laplace-smoothed counts (see the module docs). Computed in f64.
pub fn ema_step(
    count: &mut [f32],
    sum: &mut [f32],
    counts: &[f32],
    sums: &[f32],
    decay: f64,
    epsilon: f64,
) -> Vec<f32> {
    let k = count.len();
    let dim = sum.len() / k.max(1);
    for (n, c) in count.iter_mut().zip(counts) {
        *n = (decay * f64::from(*n) + (1.0 - decay) * f64::from(*c)) as f32;
    }
    for (m, s) in sum.iter_mut().zip(sums) {
        *m = (decay * f64::from(*m) + (1.0 - decay) * f64::from(*s)) as f32;
    }
    let total: f64 = count.iter().map(|n| f64::from(*n)).sum();
    let mut codebook = vec![0f32; k * dim];
    for i in 0..k {
        let smoothed = (f64::from(count[i]) + epsilon) / (total + k as f64 * epsilon) * total;
        for j in 0..dim {
            codebook[i * dim + j] = (f64::from(sum[i * dim + j]) / smoothed) as f32;
        }
    }
    codebook
}

/// The layout of a quantiser's update statistics: counts (K), then with the EMA codebook the
/// sums (K·D), then with restarts each slot's candidate count (K·S) and sum (K·S·D).
#[derive(Debug, Clone, Copy)]
struct UpdateLayout {
    codes: usize,
    dim: usize,
    sums: bool,
    restart: bool,
}

impl UpdateLayout {
    fn len(&self) -> usize {
        let (k, d, s) = (self.codes, self.dim, RESTART_SLOTS);
        k + usize::from(self.sums) * k * d + usize::from(self.restart) * (k * s + k * s * d)
    }

    /// Offsets of the sums, the candidate counts and the candidate sums.
    fn offsets(&self) -> (usize, usize, usize) {
        let (k, d, s) = (self.codes, self.dim, RESTART_SLOTS);
        let sums = k;
        let cand = sums + usize::from(self.sums) * k * d;
        (sums, cand, cand + k * s)
    }
}

/// Where a batch's nearest codes were found (see the module docs).
enum Search {
    /// On the host: each position's code, and the encoder outputs (positions, D) flattened.
    Host { indices: Vec<u32>, z: Vec<f32> },
    /// On the batch's device: the codes (positions,) u32, and the detached encoder outputs
    /// (positions, D).
    Device { indices: Tensor, rows: Tensor },
}

/// A quantised batch.
pub(crate) struct Quantised {
    search: Search,
    /// The decoder's input (B, D, h, w), straight-through.
    pub zq: Tensor,
    /// Each row's commitment `mean ‖z_e − sg(e)‖²` (B,).
    pub commitment: Tensor,
    /// Each row's codebook term `mean ‖sg(z_e) − e‖²` (B,), with the codebook loss.
    pub codebook: Option<Tensor>,
}

impl Quantised {
    /// The code of each position, row-major over (row, y, x), on the host.
    pub fn indices(&self) -> Result<Vec<u32>> {
        match &self.search {
            Search::Host { indices, .. } => Ok(indices.clone()),
            Search::Device { indices, .. } => Ok(indices.to_vec1::<u32>()?),
        }
    }

    /// The encoder outputs (positions, D) flattened, on the host.
    fn z(&self) -> Result<Cow<'_, [f32]>> {
        match &self.search {
            Search::Host { z, .. } => Ok(Cow::Borrowed(z)),
            Search::Device { rows, .. } => Ok(Cow::Owned(host_values(rows)?)),
        }
    }

    /// Each of the `codes` codes' count of positions (K) and, with `sums`, the sum of the
    /// `dim`-long encoder outputs assigned to it (K·D), as one f32 tensor on the batch's
    /// device; computed there (a one-hot matrix product) when the search ran there, so that
    /// the encoder outputs never leave it.
    pub fn assignments(&self, (codes, dim): (usize, usize), sums: bool) -> Result<Tensor> {
        match &self.search {
            Search::Host { indices, z } => {
                let mut stats = vec![0f32; codes + usize::from(sums) * codes * dim];
                add_assignments(&mut stats, codes, (indices, z, dim), sums);
                let len = stats.len();
                Ok(Tensor::from_vec(stats, len, self.zq.device())?)
            }
            Search::Device { indices, rows } => {
                let all = Tensor::arange(0u32, codes as u32, rows.device())?.unsqueeze(0)?;
                // In f32 whatever the batch's dtype: a count past 2048 is exact there, not in f16.
                let one_hot = indices
                    .unsqueeze(1)?
                    .broadcast_eq(&all)?
                    .to_dtype(DType::F32)?;
                let counts = one_hot.sum(0)?;
                if !sums {
                    return Ok(counts);
                }
                let rows = rows.to_dtype(DType::F32)?;
                let vectors = one_hot.t()?.matmul(&rows)?.flatten_all()?;
                Ok(Tensor::cat(&[counts, vectors], 0)?)
            }
        }
    }
}

/// A codebook of `codes` × `dim` over a grid of `positions`, its state named `{name}.codebook`,
/// `{name}.ema_count` and (EMA) `{name}.ema_sum`.
#[derive(Debug, Clone)]
pub(crate) struct Quantiser {
    name: String,
    codes: usize,
    dim: usize,
    positions: usize,
    /// Keeps the restart draws of two quantisers of one model apart.
    salt: u64,
    settings: CodebookSettings,
    /// (K, D): a buffer (EMA) or a parameter (codebook loss).
    codebook: Tensor,
}

impl Quantiser {
    /// A codebook uniform ±√(3/D) (sonnet's variance-scaling init) plus the offset, drawn from
    /// `rng`, declared in `params` or `buffers`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: &mut Params,
        buffers: &mut Buffers,
        rng: &mut impl Rng,
        name: &str,
        (codes, dim): (usize, usize),
        positions: usize,
        salt: u64,
        settings: CodebookSettings,
    ) -> Result<Self> {
        let bound = (3.0 / dim as f64).sqrt() as f32;
        let offset = settings.init_offset as f32;
        let init: Vec<f32> = (0..codes * dim)
            .map(|_| rng.random_range(-bound..=bound) + offset)
            .collect();
        let book = format!("{name}.codebook");
        let codebook = match settings.learning {
            CodebookLearning::Ema => {
                buffers.declare(&format!("{name}.ema_sum"), &[codes, dim], init.clone())?;
                buffers.declare(&book, &[codes, dim], init)?
            }
            CodebookLearning::Loss => params.with_values(&book, &[codes, dim], init)?,
        };
        buffers.declare(&format!("{name}.ema_count"), &[codes], vec![1.0; codes])?;
        if settings.init == CodebookInit::Kmeans {
            buffers.declare(&format!("{name}.kmeans_pending"), &[1], vec![1.0])?;
        }
        Ok(Quantiser {
            name: name.to_string(),
            codes,
            dim,
            positions,
            salt,
            settings,
            codebook,
        })
    }

    /// Codes in the codebook.
    pub fn codes(&self) -> usize {
        self.codes
    }

    fn layout(&self) -> UpdateLayout {
        let ema = self.settings.learning == CodebookLearning::Ema;
        UpdateLayout {
            codes: self.codes,
            dim: self.dim,
            sums: ema,
            restart: ema && self.settings.restart_threshold > 0.0,
        }
    }

    /// Length of the update statistics.
    pub fn update_len(&self) -> usize {
        self.layout().len()
    }

    /// The codes' EMA counts.
    pub fn usage(&self, buffers: &Buffers) -> Result<Vec<f32>> {
        buffers.values(&format!("{}.ema_count", self.name))
    }

    /// Codes whose EMA count (`usage`) is at least the restart threshold, and at least 1.
    pub fn alive(&self, usage: &[f32]) -> usize {
        let threshold = self.settings.restart_threshold.max(1.0) as f32;
        usage.iter().filter(|n| **n >= threshold).count()
    }

    /// Nearest codes of `z_e` (B, D, h, w) and the straight-through decoder input, against
    /// the codebook or (k-means initialisation) the given `centroids` (K·D).
    pub fn quantise(&self, z_e: &Tensor, centroids: Option<&[f32]>) -> Result<Quantised> {
        let (b, d, gh, gw) = z_e.dims4()?;
        let device = z_e.device();
        let rows = positions(z_e)?;
        let book = match centroids {
            Some(book) => Tensor::from_slice(book, (self.codes, d), device)?,
            None => self.codebook.clone(),
        };
        let (search, idx) = if fused_on(device) {
            let z = host_values(&rows)?;
            let indices = match centroids {
                Some(book) => nearest_codes(&z, book, d),
                None => nearest_codes(&z, &host_values(&book)?, d),
            };
            let idx = Tensor::from_slice(&indices, indices.len(), device)?;
            (Search::Host { indices, z }, idx)
        } else {
            let rows = rows.detach();
            let indices = nearest_codes_composed(&rows, &book)?;
            let idx = indices.clone();
            (Search::Device { indices, rows }, idx)
        };
        let e = book.index_select(&idx, 0)?.to_dtype(rows.dtype())?;
        let e_sg = e.detach();
        let straight = (&rows + (&e_sg - rows.detach())?)?;
        let per_row = gh * gw * d;
        let commitment = (&rows - &e_sg)?.sqr()?.reshape((b, per_row))?.mean(1)?;
        let codebook = match self.settings.learning {
            CodebookLearning::Loss => Some(
                (rows.detach() - &e)?
                    .sqr()?
                    .reshape((b, per_row))?
                    .mean(1)?,
            ),
            CodebookLearning::Ema => None,
        };
        let zq = straight
            .reshape((b, gh, gw, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(Quantised {
            search,
            zq,
            commitment,
            codebook,
        })
    }

    /// Whether the codebook still waits for its k-means initialisation.
    pub fn init_pending(&self, buffers: &Buffers) -> Result<bool> {
        if self.settings.init != CodebookInit::Kmeans {
            return Ok(false);
        }
        Ok(buffers.values(&format!("{}.kmeans_pending", self.name))?[0] > 0.5)
    }

    /// The rounds of the k-means initialisation: the seeding candidates (K·S counts, K·S·D
    /// sums), then each Lloyd round's counts and sums (K + K·D).
    pub fn init_rounds(&self) -> Vec<usize> {
        let (k, d) = (self.codes, self.dim);
        let mut rounds = vec![k * SEED_SLOTS * (1 + d)];
        rounds.extend(std::iter::repeat_n(
            k + k * d,
            self.settings.kmeans_iterations,
        ));
        rounds
    }

    /// This rank's sums of round `round` of the k-means initialisation for its encoder outputs
    /// `z_e` (B, D, h, w) of the rows `ids`, `before` holding the global sums of the rounds
    /// before it.
    pub fn init_round_statistics(
        &self,
        z_e: &Tensor,
        ids: &[u64],
        ctx: &StepContext<'_>,
        before: &[f32],
        round: usize,
    ) -> Result<Vec<f32>> {
        let rounds = self.init_rounds();
        let want: usize = rounds.iter().take(round).sum();
        if round >= rounds.len() || before.len() != want {
            return Err(ModelError::Input(format!(
                "{} k-means round {round} of {} after {} values of earlier rounds, expected {want}",
                self.name,
                rounds.len(),
                before.len()
            )));
        }
        let z = host_values(&positions(z_e)?)?;
        let mut stats = vec![0f32; rounds[round]];
        if round == 0 {
            let all = vec![true; self.codes];
            self.add_candidates(&mut stats, SEED_SLOTS, 2 + self.salt, (&z, ids), ctx, &all);
        } else {
            let centroids = self.init_centroids(before)?;
            let indices = nearest_codes(&z, &centroids, self.dim);
            add_assignments(&mut stats, self.codes, (&indices, &z, self.dim), true);
        }
        Ok(stats)
    }

    /// The centroids after the k-means rounds whose global sums are `sums` (the seeding round
    /// and any number of Lloyd rounds): K·D.
    pub fn init_centroids(&self, sums: &[f32]) -> Result<Vec<f32>> {
        let (k, d, s) = (self.codes, self.dim, SEED_SLOTS);
        let seeding = k * s * (1 + d);
        let lloyd = k + k * d;
        if sums.len() < seeding || (sums.len() - seeding) % lloyd != 0 {
            return Err(ModelError::Input(format!(
                "{} k-means sums of {} values: expected {seeding} of seeding and a multiple of \
                 {lloyd} of Lloyd rounds",
                self.name,
                sums.len()
            )));
        }
        let mut book = host_values(&self.codebook)?;
        let (counts, vectors) = sums[..seeding].split_at(k * s);
        for code in 0..k {
            let slots = code * s..(code + 1) * s;
            let single = slots.clone().find(|&t| counts[t] == 1.0);
            let fewest = slots
                .filter(|&t| counts[t] > 0.0)
                .min_by(|a, b| counts[*a].total_cmp(&counts[*b]));
            if let Some(t) = single.or(fewest) {
                for (e, v) in book[code * d..][..d].iter_mut().zip(&vectors[t * d..][..d]) {
                    *e = v / counts[t];
                }
            }
        }
        for round in sums[seeding..].chunks_exact(lloyd) {
            let (counts, vectors) = round.split_at(k);
            for (code, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0.0) {
                for (e, v) in book[code * d..][..d]
                    .iter_mut()
                    .zip(&vectors[code * d..][..d])
                {
                    *e = v / n;
                }
            }
        }
        Ok(book)
    }

    /// Adds each of this rank's outputs `z` (of the rows `ids`) that is a candidate for a slot
    /// (`slots` per code, of the codes `eligible` names) to the slot's count in `stats[..K·slots]`
    /// and its vector to the slot's sum in `stats[K·slots..]`. An output is a slot's candidate
    /// with probability 1/(outputs in the global batch), decided by draws keyed by the step,
    /// the `stream`, the row id and the position alone (geometric skips over the slots).
    fn add_candidates(
        &self,
        stats: &mut [f32],
        slots: usize,
        stream: u64,
        (z, ids): (&[f32], &[u64]),
        ctx: &StepContext<'_>,
        eligible: &[bool],
    ) {
        let d = self.dim;
        let all = self.codes * slots;
        let outputs = ctx.global_rows as f64 * self.positions as f64;
        let log_miss = (-1.0 / outputs).ln_1p();
        for (row, &id) in ids.iter().enumerate() {
            for p in 0..self.positions {
                let v = row * self.positions + p;
                let mut slot = 0u64;
                for draw in 0u64.. {
                    let key = (stream << 60) | ((p as u64) << 32) | draw;
                    let u = ctx.noise.uniform(Purpose::Choice, ctx.step, id, key);
                    slot += ((1.0 - u).ln() / log_miss).floor() as u64;
                    if slot >= all as u64 {
                        break;
                    }
                    let s = slot as usize;
                    if eligible[s / slots] {
                        stats[s] += 1.0;
                        let vector = &z[v * d..][..d];
                        for (t, x) in stats[all + s * d..][..d].iter_mut().zip(vector) {
                            *t += x;
                        }
                    }
                    slot += 1;
                }
            }
        }
    }

    /// The code vectors of `n` grids of codes (row-major): (n, D, h, w).
    pub fn lookup(&self, codes: &[u32], n: usize, grid: (usize, usize)) -> Result<Tensor> {
        let idx = Tensor::from_slice(codes, codes.len(), self.codebook.device())?;
        Ok(self
            .codebook
            .index_select(&idx, 0)?
            .reshape((n, grid.0, grid.1, self.dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// Each code's count of positions in a quantised batch (K).
    pub fn counts(&self, q: &Quantised) -> Result<Vec<f32>> {
        Ok(q.assignments((self.codes, self.dim), false)?
            .to_vec1::<f32>()?)
    }

    /// This rank's update statistics for a quantised batch of the rows `ids`, the codes' EMA
    /// counts before the step being `usage`; at the step of a k-means initialisation
    /// (`initialising`) without restart candidates. An f32 tensor on the batch's device; the
    /// encoder outputs reach the host only when a code is due for a restart.
    pub fn update_statistics(
        &self,
        usage: &[f32],
        q: &Quantised,
        ids: &[u64],
        ctx: &StepContext<'_>,
        initialising: bool,
    ) -> Result<Tensor> {
        let layout = self.layout();
        let (_, cand_at, _) = layout.offsets();
        let assigned = q.assignments((self.codes, self.dim), layout.sums)?;
        if !layout.restart {
            return Ok(assigned);
        }
        let device = q.zq.device();
        let threshold = self.settings.restart_threshold as f32;
        let dead: Vec<bool> = usage.iter().map(|n| *n < threshold).collect();
        let len = layout.len() - cand_at;
        let candidates = if initialising || !dead.contains(&true) {
            Tensor::zeros(len, DType::F32, device)?
        } else {
            let mut candidates = vec![0f32; len];
            let z = q.z()?;
            self.add_candidates(
                &mut candidates,
                RESTART_SLOTS,
                self.salt,
                (&z, ids),
                ctx,
                &dead,
            );
            Tensor::from_vec(candidates, len, device)?
        };
        Ok(Tensor::cat(&[assigned, candidates], 0)?)
    }

    /// Applies a step's all-reduced update statistics: the EMA step and the restarts (or, with
    /// the codebook loss, the usage counts only).
    pub fn update_state(&self, buffers: &Buffers, stats: &[f32]) -> Result<()> {
        let layout = self.layout();
        if stats.len() != layout.len() {
            return Err(ModelError::Input(format!(
                "{} update statistics of {} values, expected {}",
                self.name,
                stats.len(),
                layout.len()
            )));
        }
        let (k, d) = (self.codes, self.dim);
        let (sums_at, cand_at, cand_sums_at) = layout.offsets();
        let counts = &stats[..k];
        let count_name = format!("{}.ema_count", self.name);
        let mut count = buffers.values(&count_name)?;
        if !layout.sums {
            let g = self.settings.decay;
            for (n, c) in count.iter_mut().zip(counts) {
                *n = (g * f64::from(*n) + (1.0 - g) * f64::from(*c)) as f32;
            }
            return buffers.set(&count_name, &count);
        }
        let sum_name = format!("{}.ema_sum", self.name);
        let mut sum = buffers.values(&sum_name)?;
        let initialising = self.init_pending(buffers)?;
        if initialising {
            // The EMA starts as any codebook's does (N = 1, m = e), at this step's centroids.
            count.fill(1.0);
            for (code, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0.0) {
                let step_sums = &stats[sums_at + code * d..][..d];
                for (m, s) in sum[code * d..][..d].iter_mut().zip(step_sums) {
                    *m = s / n;
                }
            }
        }
        let mut codebook = ema_step(
            &mut count,
            &mut sum,
            counts,
            &stats[sums_at..][..k * d],
            self.settings.decay,
            self.settings.epsilon,
        );
        if initialising {
            buffers.set(&format!("{}.kmeans_pending", self.name), &[0.0])?;
        } else if layout.restart {
            let reset = self.settings.restart_threshold as f32;
            for code in 0..k {
                let slot = (0..RESTART_SLOTS)
                    .map(|s| code * RESTART_SLOTS + s)
                    .find(|s| stats[cand_at + s] == 1.0);
                if let Some(s) = slot {
                    let vector = &stats[cand_sums_at + s * d..][..d];
                    codebook[code * d..][..d].copy_from_slice(vector);
                    count[code] = reset;
                    for (m, v) in sum[code * d..][..d].iter_mut().zip(vector) {
                        *m = reset * v;
                    }
                }
            }
        }
        buffers.set(&count_name, &count)?;
        buffers.set(&sum_name, &sum)?;
        buffers.set(&format!("{}.codebook", self.name), &codebook)
    }

    /// `n` grids of codes drawn independently per position from the EMA usage.
    pub fn draw_codes(&self, buffers: &Buffers, n: usize, rng: &mut impl Rng) -> Result<Vec<u32>> {
        let usage = self.usage(buffers)?;
        let total: f64 = usage.iter().map(|u| f64::from(u.max(0.0))).sum();
        Ok((0..n * self.positions)
            .map(|_| {
                let mut u = rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
                for (k, c) in usage.iter().enumerate() {
                    u -= f64::from(c.max(0.0));
                    if u < 0.0 {
                        return k as u32;
                    }
                }
                (self.codes - 1) as u32
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// The composed search finds the host search's codes, with codes whose norms differ by
    /// more than a factor of ten (so that a wrong `‖e‖²` weight moves rows to other codes).
    #[test]
    fn the_composed_search_finds_the_host_searchs_codes() {
        let (n, k, d) = (600, 16, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let book: Vec<f32> = (0..k * d)
            .map(|j| (0.2 + 0.2 * (j / d) as f32) * rng.random_range(-1.0f32..1.0))
            .collect();
        let z: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let want = nearest_codes(&z, &book, d);
        let rows = Tensor::from_slice(&z, (n, d), &Device::Cpu).unwrap();
        let codebook = Tensor::from_slice(&book, (k, d), &Device::Cpu).unwrap();
        let got = nearest_codes_composed(&rows, &codebook)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want);
        let used = want.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(used > k / 2, "{used} of {k} codes in use");
    }
}
