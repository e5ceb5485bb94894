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
//! the one-hot counts and sums of the update statistics (assignments and restart candidates)
//! are computed there too. Straight-through: the decoder reads `z_e + sg(e − z_e)`, so
//! `∂/∂z_e` is the identity.
//!
//! **EMA codebook** (non-gradient state in [`Buffers`]): each step's one-hot counts `n_i` and
//! sums `s_i` of the encoder outputs assigned to code i are update statistics — summed across
//! ranks in the all-reduce that carries the gradients — and every replica then updates
//! `N_i ← γN_i + (1−γ)n_i`, `m_i ← γm_i + (1−γ)s_i` and `e_i = m_i / Ñ_i` with the
//! Laplace-smoothed `Ñ_i = (N_i + ε)/(ΣN + Kε)·ΣN`. N starts at 1 and m at the initial codebook
//! (Jukebox's start: an unused code keeps its place instead of jumping to m/ε). With the
//! codebook loss instead, the codebook is a parameter and N only tracks usage. The update runs
//! on the codebook's device, in f32, from one upload of the all-reduced statistics, and each
//! step's figures (codes alive, perplexity) are computed there too: a GPU step reads no state
//! back to the host.
//!
//! **Dead-code restart.** A code whose `N_i` is below the restart threshold before a step is
//! replaced by one encoder output of that step's *global* batch, and its statistics reset
//! (`N_i` = the threshold, `m_i = N_i·e_i`). The choice is a function of the run seed, the
//! step and each output's (row id, position) only: every output holds a seeded draw for each
//! of [`RESTART_SLOTS`] slots of each code, an output is a slot's candidate with probability
//! 1/(outputs in the global batch), and a slot with exactly one candidate names it — counts
//! and sums of the candidates ride in the same all-reduce, so every rank, at any world size,
//! restarts the same codes with the same vectors. A code whose slots all miss (about 16% of
//! steps) waits for the next step. The draws read no encoder output, and every code's slots
//! collect candidates; the update keeps those of the codes that were dead, so the counts that
//! decide it never leave the device.
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

/// For `ids` (N,) u32 below `classes`: each class's count (classes) and, with `vectors` (N, D),
/// the sum of the vectors of its ids (classes·D), as one f32 tensor on their device: a one-hot
/// matrix and its product with the vectors, in f32 whatever their dtype (a count past 2048 is
/// exact there, not in f16; a class with one id gets that vector exactly).
fn one_hot_sums(ids: &Tensor, classes: usize, vectors: Option<&Tensor>) -> Result<Tensor> {
    let all = Tensor::arange(0u32, classes as u32, ids.device())?.unsqueeze(0)?;
    let one_hot = ids.unsqueeze(1)?.broadcast_eq(&all)?.to_dtype(DType::F32)?;
    let counts = one_hot.sum(0)?;
    let Some(vectors) = vectors else {
        return Ok(counts);
    };
    let sums = one_hot.t()?.matmul(&vectors.to_dtype(DType::F32)?)?;
    Ok(Tensor::cat(&[counts, sums.flatten_all()?], 0)?)
}

/// An encoder output of this rank that is a candidate for a slot (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    slot: u32,
    /// Row-major over (row, position).
    output: u32,
}

/// Adds each candidate's count to its slot's in `stats[..slots]` and its output's vector (of
/// the `dim`-long outputs `z`) to the slot's sum in `stats[slots..]`.
fn add_candidates(stats: &mut [f32], slots: usize, (found, z, dim): (&[Candidate], &[f32], usize)) {
    for c in found {
        let s = c.slot as usize;
        stats[s] += 1.0;
        let vector = &z[c.output as usize * dim..][..dim];
        for (t, x) in stats[slots + s * dim..][..dim].iter_mut().zip(vector) {
            *t += x;
        }
    }
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
            Search::Device { indices, rows } => one_hot_sums(indices, codes, sums.then_some(rows)),
        }
    }

    /// Each of `slots` slots' count of the candidates `found` (slots) and the sum of their
    /// `dim`-long encoder outputs (slots·D), as one f32 tensor on the batch's device; summed
    /// there (a one-hot matrix product) when the search ran there.
    fn candidate_statistics(
        &self,
        found: &[Candidate],
        (slots, dim): (usize, usize),
    ) -> Result<Tensor> {
        let device = self.zq.device();
        match &self.search {
            Search::Host { z, .. } => {
                let mut stats = vec![0f32; slots * (1 + dim)];
                add_candidates(&mut stats, slots, (found, z, dim));
                let len = stats.len();
                Ok(Tensor::from_vec(stats, len, device)?)
            }
            Search::Device { .. } if found.is_empty() => {
                Ok(Tensor::zeros(slots * (1 + dim), DType::F32, device)?)
            }
            Search::Device { rows, .. } => {
                let column = |f: fn(&Candidate) -> u32| {
                    let v: Vec<u32> = found.iter().map(f).collect();
                    Tensor::from_vec(v, found.len(), device)
                };
                let vectors = rows.index_select(&column(|c| c.output)?, 0)?;
                one_hot_sums(&column(|c| c.slot)?, slots, Some(&vectors))
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

    /// The codes alive (an EMA count of at least the restart threshold, and at least 1) and
    /// the perplexity of the EMA counts (0 when they sum to 0), as f32 scalars on the
    /// codebook's device: each step's figures, never read back there.
    pub fn usage_figures(&self, buffers: &Buffers) -> Result<(Tensor, Tensor)> {
        let usage = buffers.tensor(&format!("{}.ema_count", self.name))?;
        let threshold = self.settings.restart_threshold.max(1.0);
        let alive = usage.ge(threshold)?.to_dtype(DType::F32)?.sum_all()?;
        let total = usage.sum_all()?;
        let p = usage.broadcast_div(&total.clamp(f32::MIN_POSITIVE, f32::MAX)?)?;
        let entropy = (&p * p.clamp(f32::MIN_POSITIVE, 1.0)?.log()?)?
            .sum_all()?
            .neg()?;
        let perplexity = (entropy.exp()? * total.gt(0.0)?.to_dtype(DType::F32)?)?;
        Ok((alive, perplexity))
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
            let found = self.candidates(SEED_SLOTS, 2 + self.salt, ids, ctx);
            add_candidates(&mut stats, self.codes * SEED_SLOTS, (&found, &z, self.dim));
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

    /// This rank's candidates among `slots` slots per code, as (slot, output) pairs in the
    /// order of its outputs (row-major over its rows `ids` and their positions). An output is a
    /// slot's candidate with probability 1/(outputs in the global batch), decided by draws keyed
    /// by the step, the `stream`, the row id and the position alone (geometric skips over the
    /// slots): the encoder outputs are not read, so the draws need nothing from the device.
    fn candidates(
        &self,
        slots: usize,
        stream: u64,
        ids: &[u64],
        ctx: &StepContext<'_>,
    ) -> Vec<Candidate> {
        let all = (self.codes * slots) as u64;
        let outputs = ctx.global_rows as f64 * self.positions as f64;
        let log_miss = (-1.0 / outputs).ln_1p();
        let positions = self.positions;
        ids.par_iter()
            .enumerate()
            .flat_map_iter(|(row, &id)| {
                let mut found = Vec::new();
                for p in 0..positions {
                    let mut slot = 0u64;
                    for draw in 0u64.. {
                        let key = (stream << 60) | ((p as u64) << 32) | draw;
                        let u = ctx.noise.uniform(Purpose::Choice, ctx.step, id, key);
                        slot += ((1.0 - u).ln() / log_miss).floor() as u64;
                        if slot >= all {
                            break;
                        }
                        found.push(Candidate {
                            slot: slot as u32,
                            output: (row * positions + p) as u32,
                        });
                        slot += 1;
                    }
                }
                found
            })
            .collect()
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

    /// This rank's update statistics for a quantised batch of the rows `ids`; at the step of a
    /// k-means initialisation (`initialising`) without restart candidates. An f32 tensor on the
    /// batch's device, computed there: the candidates of every code's restart slots are
    /// summed, and [`Quantiser::update_state`] keeps those of the codes that were dead.
    pub fn update_statistics(
        &self,
        q: &Quantised,
        ids: &[u64],
        ctx: &StepContext<'_>,
        initialising: bool,
    ) -> Result<Tensor> {
        let layout = self.layout();
        let assigned = q.assignments((self.codes, self.dim), layout.sums)?;
        if !layout.restart {
            return Ok(assigned);
        }
        let found = if initialising {
            Vec::new()
        } else {
            self.candidates(RESTART_SLOTS, self.salt, ids, ctx)
        };
        let candidates = q.candidate_statistics(&found, (self.codes * RESTART_SLOTS, self.dim))?;
        Ok(Tensor::cat(&[assigned, candidates], 0)?)
    }

    /// Applies a step's all-reduced update statistics: the EMA step and the restarts (or, with
    /// the codebook loss, the usage counts only). Computed on the codebook's device, in f32,
    /// from one upload of the statistics (and, when a slot found one candidate, of each code's
    /// restart slot): nothing is read back (with `init = "kmeans"`, the pending flag is).
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
        let device = self.codebook.device();
        let step = Tensor::from_slice(stats, stats.len(), device)?;
        let counts = step.narrow(0, 0, k)?;
        let count_name = format!("{}.ema_count", self.name);
        // The codes' counts before the step: a code below the restart threshold is dead.
        let count = buffers.tensor(&count_name)?;
        let g = self.settings.decay;
        let ema = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
            Ok((old.affine(g, 0.0)? + new.affine(1.0 - g, 0.0)?)?)
        };
        if !layout.sums {
            return buffers.set_tensor(&count_name, &ema(&count, &counts)?);
        }
        let sums = step.narrow(0, sums_at, k * d)?.reshape((k, d))?;
        let sum_name = format!("{}.ema_sum", self.name);
        let mut sum = buffers.tensor(&sum_name)?;
        let initialising = self.init_pending(buffers)?;
        let mut count_next = if initialising {
            // The EMA starts as any codebook's does (N = 1, m = e), at this step's centroids:
            // a code with outputs at their mean, the others where they were.
            let used = counts.gt(0.0)?.unsqueeze(1)?.broadcast_as((k, d))?;
            let means = sums.broadcast_div(&counts.clamp(1.0, f32::MAX)?.unsqueeze(1)?)?;
            sum = used.where_cond(&means, &sum)?;
            ema(&Tensor::ones(k, DType::F32, device)?, &counts)?
        } else {
            ema(&count, &counts)?
        };
        let mut sum_next = ema(&sum, &sums)?;
        // Laplace smoothing: Ñ_i = (N_i + ε)/(ΣN + Kε)·ΣN.
        let eps = self.settings.epsilon;
        let total = count_next.sum_all()?;
        let scale = (&total / total.affine(1.0, k as f64 * eps)?)?;
        let smoothed = count_next.affine(1.0, eps)?.broadcast_mul(&scale)?;
        let mut codebook = sum_next.broadcast_div(&smoothed.unsqueeze(1)?)?;
        if initialising {
            buffers.set(&format!("{}.kmeans_pending", self.name), &[0.0])?;
        } else if let Some(slots) = self.restart_slots(stats, layout) {
            let slots = Tensor::from_vec(slots, k, device)?;
            let all = k * RESTART_SLOTS;
            let single = step
                .narrow(0, cand_at, all)?
                .index_select(&slots, 0)?
                .eq(1.0)?;
            let vectors = step
                .narrow(0, cand_sums_at, all * d)?
                .reshape((all, d))?
                .index_select(&slots, 0)?;
            let reset = self.settings.restart_threshold;
            let restart = (count.lt(reset)? * single)?;
            let rows = restart.unsqueeze(1)?.broadcast_as((k, d))?;
            codebook = rows.where_cond(&vectors, &codebook)?;
            sum_next = rows.where_cond(&vectors.affine(reset, 0.0)?, &sum_next)?;
            count_next =
                restart.where_cond(&count_next.ones_like()?.affine(reset, 0.0)?, &count_next)?;
        }
        buffers.set_tensor(&count_name, &count_next)?;
        buffers.set_tensor(&sum_name, &sum_next)?;
        buffers.set_tensor(&format!("{}.codebook", self.name), &codebook)
    }

    /// From a step's all-reduced update statistics (host values), each code's restart slot:
    /// the first of its slots that found exactly one candidate, else its first slot (whose
    /// count is then not 1); None when no slot found one or restarts are off.
    fn restart_slots(&self, stats: &[f32], layout: UpdateLayout) -> Option<Vec<u32>> {
        if !layout.restart {
            return None;
        }
        let (_, cand_at, _) = layout.offsets();
        let counts = &stats[cand_at..][..self.codes * RESTART_SLOTS];
        let single = |s: &usize| counts[*s] == 1.0;
        let slots: Vec<u32> = (0..self.codes)
            .map(|code| {
                let first = code * RESTART_SLOTS;
                (first..first + RESTART_SLOTS).find(single).unwrap_or(first) as u32
            })
            .collect();
        counts.contains(&1.0).then_some(slots)
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

    /// A dead code restarts only at a slot with exactly one candidate: a code whose slots
    /// found two candidates, or none, keeps its place, however many candidates it had.
    #[test]
    fn a_dead_code_restarts_only_at_a_slot_with_one_candidate() {
        let (k, d) = (3, 2);
        let settings = CodebookSettings {
            learning: CodebookLearning::Ema,
            decay: 0.5,
            epsilon: 1e-5,
            restart_threshold: 2.0,
            init_offset: 0.0,
            init: CodebookInit::Uniform,
            kmeans_iterations: 0,
        };
        let mut params = Params::new(&Device::Cpu, 0);
        let mut buffers = Buffers::new(&Device::Cpu);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let q = Quantiser::new(
            &mut params,
            &mut buffers,
            &mut rng,
            "q",
            (k, d),
            1,
            0,
            settings,
        )
        .unwrap();
        let before = buffers.values("q.codebook").unwrap();
        // Every code is dead (counts start at 1, below 2). Code 0: two candidates in its
        // first slot; code 1: one in its third; code 2: none.
        let s = RESTART_SLOTS;
        let mut stats = vec![0f32; q.update_len()];
        let (_, cand_at, cand_sums_at) = q.layout().offsets();
        stats[cand_at] = 2.0;
        stats[cand_sums_at..][..d].copy_from_slice(&[5.0, 7.0]);
        stats[cand_at + s + 2] = 1.0;
        stats[cand_sums_at + (s + 2) * d..][..d].copy_from_slice(&[3.0, -4.0]);
        q.update_state(&buffers, &stats).unwrap();
        let count = buffers.values("q.ema_count").unwrap();
        let book = buffers.values("q.codebook").unwrap();
        assert_eq!(count, vec![0.5, 2.0, 0.5], "only code 1 is reset");
        assert_eq!(&book[d..2 * d], &[3.0, -4.0], "code 1 at its candidate");
        for code in [0, 2] {
            for (a, b) in book[code * d..][..d].iter().zip(&before[code * d..][..d]) {
                assert!(
                    (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "code {code} stays: {a} vs {b}"
                );
            }
        }
    }

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
