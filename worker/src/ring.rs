//! Ring all-reduce over a [`RingTransport`]: reduce-scatter, then all-gather, each N−1 rounds
//! around the ring, every segment cut into chunks. Sum semantics. For a fixed ring the
//! summation order of every element is fixed — segment `s` is folded in ring order starting at
//! rank `s`, completed at its owner (rank `s − 1`) and then copied around — so every rank ends
//! with the same bits.
//!
//! The chunks flow as a pipeline, not round by round: a rank answers each chunk as it arrives.
//! A partial sum is added to this rank's values straight into the outgoing message (the sum
//! is never stored: the all-gather overwrites that part of the buffer later), and a reduced
//! chunk of the all-gather is passed on as it came, without re-encoding its values. Beside
//! those answers the rank feeds in its own segment, keeping a few of its chunks (the depth) on
//! their way round at once.
//!
//! Every incoming chunk is checked against what the schedule allows — generation, step, phase,
//! round, the next chunk index of that round, a chunk only after its previous round, and its
//! length — and rejected, never summed, otherwise. Every receive has a deadline: no hang
//! outlives it.
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

/// One chunk on the wire, tagged with where it belongs in the schedule. Sent as an
/// [`Outgoing`] (so a transport writes the values once, straight into its wire format),
/// received owned.
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

/// The values of an outgoing chunk, described rather than materialised: the transport writes
/// them into its wire format in one pass.
#[derive(Debug)]
pub enum Outgoing<'a, P> {
    /// Values of this rank's buffer.
    Values(&'a [f32]),
    /// This rank's values plus received ones, element by element (`own[i] + received[i]`).
    Sum(&'a [f32], &'a P),
    /// Received values, passed on unchanged.
    Forward(P),
}

impl<P: Payload> Outgoing<'_, P> {
    /// The values, computed.
    pub fn to_vec(&self) -> Vec<f32> {
        match self {
            Outgoing::Values(v) => v.to_vec(),
            Outgoing::Sum(own, received) => {
                let mut out = own.to_vec();
                received.add_into(&mut out);
                out
            }
            Outgoing::Forward(p) => {
                let mut out = vec![0.0; p.len()];
                p.copy_into(&mut out);
                out
            }
        }
    }
}

impl<P: Payload> Chunk<Outgoing<'_, P>> {
    /// An owned copy with the values computed.
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
    fn send(&mut self, chunk: Chunk<Outgoing<'_, Self::Payload>>) -> Result<()>;
    /// The next chunk from the previous rank, or an error once `deadline` passes.
    fn recv(
        &mut self,
        deadline: Instant,
    ) -> impl Future<Output = Result<Chunk<Self::Payload>>> + Send;
}

/// How a ring all-reduce moves the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSettings {
    /// Largest chunk sent, in values.
    pub chunk_len: usize,
    /// Chunks of its own segment a rank keeps on their way around the ring at once (at least
    /// 1): it feeds in the next one when a chunk's all-gather completes here. More keeps a
    /// long or slow link busy; 1 measured fastest when ranks share cores (see
    /// `cluster.ring_depth`).
    pub depth: usize,
    /// How long a receive waits.
    pub timeout: Duration,
}

/// A ring all-reduce of one rank.
pub struct RingAllReduce<T: RingTransport> {
    transport: T,
    generation: u64,
    step: u64,
    chunk_len: usize,
    depth: usize,
    timeout: Duration,
}

/// `len` elements cut into `parts` near-equal contiguous ranges (the first ones one larger).
fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl<T: RingTransport> RingAllReduce<T> {
    /// A collective over `transport` for ring generation `generation`, moving data as
    /// `settings` say.
    pub fn new(transport: T, generation: u64, settings: RingSettings) -> Result<Self> {
        let RingSettings {
            chunk_len,
            depth,
            timeout,
        } = settings;
        if chunk_len == 0
            || depth == 0
            || transport.world() == 0
            || transport.rank() >= transport.world()
        {
            return Err(WorkerError::Invalid(format!(
                "ring all-reduce: chunk length {chunk_len} and depth {depth} must be positive and rank {} inside a world of {}",
                transport.rank(),
                transport.world()
            )));
        }
        Ok(RingAllReduce {
            transport,
            generation,
            step: 0,
            chunk_len,
            depth,
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

    /// Replaces `buf` with the element-wise sum over all ranks' `buf`s (same length on every rank).
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = self.transport.world();
        if n == 1 {
            self.step += 1;
            return Ok(());
        }
        let schedule = Schedule::new(buf.len(), n, self.transport.rank(), self.chunk_len);
        let (stages, last_reduce) = (schedule.stages(), schedule.rounds() - 1);
        // Chunks received so far in each stage.
        let mut received = vec![0usize; stages];
        let mut left: usize = (0..stages).map(|s| schedule.chunks_in(s)).sum();
        // Chunks of this rank's own segment sent, and chunks whose all-gather ended here. A
        // rank feeds in its next chunk while fewer than `depth` are on their way; since the
        // segments' chunk counts differ by at most one, every rank can always feed all of its
        // own, so the pipeline cannot stall.
        let (mut fed, mut finished) = (0, 0);
        while left > 0 {
            while fed < schedule.own_chunks() && fed < finished + self.depth {
                let data = Outgoing::Values(&buf[schedule.own_piece(fed)]);
                self.send(&schedule, 0, fed, data)?;
                fed += 1;
            }
            let (stage, c, range, data) = self.receive(&schedule, &received).await?;
            received[stage] += 1;
            left -= 1;
            if stage < last_reduce {
                self.send(&schedule, stage + 1, c, Outgoing::Sum(&buf[range], &data))?;
            } else if stage == last_reduce {
                // This rank owns the segment: the sum is complete and goes around.
                let sum = &mut buf[range];
                data.add_into(sum);
                self.send(&schedule, stage + 1, c, Outgoing::Values(sum))?;
            } else {
                data.copy_into(&mut buf[range]);
                if stage + 1 < stages {
                    self.send(&schedule, stage + 1, c, Outgoing::Forward(data))?;
                } else {
                    finished += 1;
                }
            }
        }
        self.step += 1;
        Ok(())
    }

    /// Sends chunk `index` of stage `stage`.
    fn send(
        &mut self,
        schedule: &Schedule,
        stage: usize,
        index: usize,
        data: Outgoing<'_, T::Payload>,
    ) -> Result<()> {
        let (phase, round) = schedule.phase_round(stage);
        self.transport.send(Chunk {
            generation: self.generation,
            step: self.step,
            phase,
            round: round as u32,
            index: index as u32,
            data,
        })
    }

    /// The next chunk from the previous rank as (stage, chunk index, its range of the buffer,
    /// values), if the schedule allows it now: this collective, the next index of its stage,
    /// after the same chunk of the previous stage where that exists (the previous rank can
    /// only produce them in that order), the right length.
    async fn receive(
        &mut self,
        schedule: &Schedule,
        received: &[usize],
    ) -> Result<(usize, usize, Range<usize>, T::Payload)> {
        let deadline = Instant::now() + self.timeout;
        let chunk = self.transport.recv(deadline).await?;
        let c = chunk.index as usize;
        let in_order = |stage: usize| {
            chunk.generation == self.generation
                && chunk.step == self.step
                && c == received[stage]
                && c < schedule.chunks_in(stage)
                && (stage == 0 || c < received[stage - 1] || c >= schedule.chunks_in(stage - 1))
        };
        let Some(stage) = schedule
            .stage(chunk.phase, chunk.round)
            .filter(|&s| in_order(s))
        else {
            return Err(self.rejected(&chunk));
        };
        let range = schedule.piece_in(stage, c);
        if range.len() != chunk.data.len() {
            return Err(self.rejected(&chunk));
        }
        Ok((stage, c, range, chunk.data))
    }

    /// The error for a chunk the schedule does not allow.
    fn rejected(&self, chunk: &Chunk<T::Payload>) -> WorkerError {
        let got = (
            chunk.generation,
            chunk.step,
            chunk.phase,
            chunk.round,
            chunk.index,
            chunk.data.len(),
        );
        WorkerError::Ring(format!(
            "rejected a chunk (generation, step, phase, round, index, length) = {got:?}: generation {}, step {} expects the next chunk of a round after the same chunk of the round before, in order, of the segment's length",
            self.generation, self.step
        ))
    }
}

/// Which values move when, for one rank of one all-reduce. Stage `s` is reduce-scatter round
/// `s` for `s < N − 1`, then all-gather round `s − (N − 1)`; in stage `s` a rank sends segment
/// `r − s` and receives segment `r − s − 1` (mod N), so what it receives in one stage is what
/// it sends in the next. After the reduce-scatter rank `r` holds the sum of segment `r + 1`.
struct Schedule {
    len: usize,
    world: usize,
    rank: usize,
    chunk_len: usize,
}

impl Schedule {
    fn new(len: usize, world: usize, rank: usize, chunk_len: usize) -> Self {
        Schedule {
            len,
            world,
            rank,
            chunk_len,
        }
    }

    /// Rounds per phase.
    fn rounds(&self) -> usize {
        self.world - 1
    }

    fn stages(&self) -> usize {
        2 * self.rounds()
    }

    /// The phase and round of stage `stage`.
    fn phase_round(&self, stage: usize) -> (Phase, usize) {
        if stage < self.rounds() {
            (Phase::ReduceScatter, stage)
        } else {
            (Phase::AllGather, stage - self.rounds())
        }
    }

    /// The stage of `round` of `phase`, if there is one.
    fn stage(&self, phase: Phase, round: u32) -> Option<usize> {
        let round = usize::try_from(round).ok().filter(|&r| r < self.rounds())?;
        Some(match phase {
            Phase::ReduceScatter => round,
            Phase::AllGather => self.rounds() + round,
        })
    }

    fn segment(&self, s: usize) -> Range<usize> {
        split(self.len, self.world, s % self.world)
    }

    fn segment_in(&self, stage: usize) -> Range<usize> {
        self.segment(self.rank + 2 * self.world - stage - 1)
    }

    /// Chunks of a segment (an empty one still sends one empty chunk).
    fn chunks(&self, segment: &Range<usize>) -> usize {
        segment.len().div_ceil(self.chunk_len).max(1)
    }

    fn chunks_in(&self, stage: usize) -> usize {
        self.chunks(&self.segment_in(stage))
    }

    /// Chunks of this rank's own segment, which it feeds in (stage 0 sends them).
    fn own_chunks(&self) -> usize {
        self.chunks(&self.segment(self.rank))
    }

    fn piece(&self, segment: Range<usize>, c: usize) -> Range<usize> {
        let start = segment.start + c * self.chunk_len;
        start..(start + self.chunk_len).min(segment.end)
    }

    fn piece_in(&self, stage: usize, c: usize) -> Range<usize> {
        self.piece(self.segment_in(stage), c)
    }

    fn own_piece(&self, c: usize) -> Range<usize> {
        self.piece(self.segment(self.rank), c)
    }
}
