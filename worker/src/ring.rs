//! Ring all-reduce over a [`RingTransport`]: reduce-scatter, then all-gather, each N−1 rounds
//! around the ring, every segment cut into chunks so that sending, receiving and summing
//! overlap on a streaming transport. Mean semantics. For a fixed ring the summation order of
//! every element is fixed — segment `s` is folded in ring order starting at rank `s`, divided by
//! N at its owner (rank `s − 1`) and then copied around — so every rank ends with the same bits.
//!
//! Every incoming chunk is checked against what the schedule expects — generation, step,
//! phase, round, chunk index and length — and rejected, never summed, otherwise. Every receive
//! has a deadline: no hang outlives it.
//!
//! The algorithm is a future: a transport runs it on the same thread as its network I/O, so a
//! chunk that arrives is summed without waking another thread.

use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::error::{Result, WorkerError};

/// The two halves of the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Partial sums travel around the ring.
    ReduceScatter,
    /// Reduced segments travel around the ring.
    AllGather,
}

/// One chunk on the wire, tagged with where it belongs in the schedule. Sent as a borrowed
/// slice of the buffer (`Chunk<&[f32]>`, so a transport copies it once, straight into its wire
/// format), received owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk<D = Vec<f32>> {
    /// Membership generation of the ring.
    pub generation: u64,
    /// Collective sequence number (one per all-reduce).
    pub step: u64,
    /// Which half.
    pub phase: Phase,
    /// Round within the phase, 0..N−1.
    pub round: u32,
    /// Chunk index within the segment.
    pub index: u32,
    /// The values.
    pub data: D,
}

impl Chunk<&[f32]> {
    /// An owned copy.
    pub fn to_owned_chunk(&self) -> Chunk {
        Chunk {
            generation: self.generation,
            step: self.step,
            phase: self.phase,
            round: self.round,
            index: self.index,
            data: self.data.to_vec(),
        }
    }
}

/// Received values, in whatever form the transport holds them.
pub trait Payload {
    /// Number of values.
    fn len(&self) -> usize;
    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `acc[i] += self[i]`.
    fn add_into(&self, acc: &mut [f32]);
    /// `dst[i] = self[i]`.
    fn copy_into(&self, dst: &mut [f32]);
}

impl Payload for Vec<f32> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn add_into(&self, acc: &mut [f32]) {
        acc.iter_mut().zip(self).for_each(|(a, d)| *a += d);
    }
    fn copy_into(&self, dst: &mut [f32]) {
        dst.copy_from_slice(self);
    }
}

/// Point-to-point links of one rank: it sends to the next rank and receives from the previous.
pub trait RingTransport: Send {
    /// How received values are held.
    type Payload: Payload + Send;
    /// This rank.
    fn rank(&self) -> usize;
    /// Ring size.
    fn world(&self) -> usize;
    /// Sends a chunk to the next rank (must not wait for the receiver to consume it).
    fn send(&mut self, chunk: Chunk<&[f32]>) -> Result<()>;
    /// The next chunk from the previous rank, or an error once `deadline` passes.
    fn recv(
        &mut self,
        deadline: Instant,
    ) -> impl Future<Output = Result<Chunk<Self::Payload>>> + Send;
}

/// A ring all-reduce of one rank.
pub struct RingAllReduce<T: RingTransport> {
    transport: T,
    generation: u64,
    step: u64,
    chunk_len: usize,
    timeout: Duration,
}

/// `len` elements cut into `parts` near-equal contiguous ranges (the first ones one larger).
fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl<T: RingTransport> RingAllReduce<T> {
    /// A collective over `transport` for ring generation `generation`, sending chunks of at
    /// most `chunk_len` values; each receive waits at most `timeout`.
    pub fn new(transport: T, generation: u64, chunk_len: usize, timeout: Duration) -> Result<Self> {
        if chunk_len == 0 || transport.world() == 0 || transport.rank() >= transport.world() {
            return Err(WorkerError::Invalid(format!(
                "ring all-reduce: chunk length {chunk_len} must be positive and rank {} inside a world of {}",
                transport.rank(),
                transport.world()
            )));
        }
        Ok(RingAllReduce {
            transport,
            generation,
            step: 0,
            chunk_len,
            timeout,
        })
    }

    /// Collectives completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    async fn expect(
        &mut self,
        phase: Phase,
        round: u32,
        index: u32,
        len: usize,
    ) -> Result<T::Payload> {
        let deadline = Instant::now() + self.timeout;
        let chunk = self.transport.recv(deadline).await?;
        let want = (self.generation, self.step, phase, round, index, len);
        let got = (
            chunk.generation,
            chunk.step,
            chunk.phase,
            chunk.round,
            chunk.index,
            chunk.data.len(),
        );
        if got != want {
            return Err(WorkerError::Ring(format!(
                "rejected a chunk (generation, step, phase, round, index, length) = {got:?}, expected {want:?}"
            )));
        }
        Ok(chunk.data)
    }

    /// Replaces `buf` with the element-wise mean over all ranks' `buf`s (same length on every rank).
    pub async fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = self.transport.world();
        if n == 1 {
            self.step += 1;
            return Ok(());
        }
        let r = self.transport.rank();
        let len = buf.len();
        let segment = move |s: usize| split(len, n, s % n);
        // Reduce-scatter: in round k, send segment (r − k) and add the incoming (r − k − 1);
        // after N−1 rounds rank r holds the full sum of segment (r + 1).
        let reduce = |k: usize| (segment(r + n - k), segment(r + 2 * n - k - 1));
        self.phase(buf, Phase::ReduceScatter, reduce, |acc, d| d.add_into(acc))
            .await?;
        let scale = 1.0 / n as f32;
        buf[segment(r + 1)].iter_mut().for_each(|v| *v *= scale);
        // All-gather: in round k, send segment (r + 1 − k) and take the incoming (r − k).
        let gather = |k: usize| (segment(r + 1 + n - k), segment(r + n - k));
        self.phase(buf, Phase::AllGather, gather, |dst, d| d.copy_into(dst))
            .await?;
        self.step += 1;
        Ok(())
    }

    /// One phase: in each of the N−1 rounds, send segment `segments(round).0` and fold the
    /// incoming segment `segments(round).1` into `buf` with `combine`, chunk by chunk.
    async fn phase(
        &mut self,
        buf: &mut [f32],
        phase: Phase,
        segments: impl Fn(usize) -> (Range<usize>, Range<usize>),
        combine: fn(&mut [f32], &T::Payload),
    ) -> Result<()> {
        let chunk_len = self.chunk_len;
        let chunks = |seg: &Range<usize>| seg.len().div_ceil(chunk_len).max(1);
        let piece = |seg: &Range<usize>, c: usize| {
            let start = seg.start + c * chunk_len;
            start..(start + chunk_len).min(seg.end)
        };
        for round in 0..self.transport.world() - 1 {
            let (out_seg, in_seg) = segments(round);
            for c in 0..chunks(&out_seg).max(chunks(&in_seg)) {
                if c < chunks(&out_seg) {
                    let chunk = Chunk {
                        generation: self.generation,
                        step: self.step,
                        phase,
                        round: round as u32,
                        index: c as u32,
                        data: &buf[piece(&out_seg, c)],
                    };
                    self.transport.send(chunk)?;
                }
                if c < chunks(&in_seg) {
                    let range = piece(&in_seg, c);
                    let data = self
                        .expect(phase, round as u32, c as u32, range.len())
                        .await?;
                    combine(&mut buf[range], &data);
                }
            }
        }
        Ok(())
    }
}
