//! The coordinator's state machine: sessions, the rendezvous, generations, step commit, replica
//! checks and checkpoints. Every transition happens under one lock, held briefly and never across
//! an await.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use elbo_proto::v1 as pb;
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::{CommittedStep, RunStore, Settings, StepTimings, Summary};

/// Commands to one worker.
pub(crate) type Outbox = mpsc::UnboundedSender<Result<pb::Command, Status>>;

/// A joined worker.
pub(crate) struct Member {
    pub worker_id: String,
    pub peer: SocketAddr,
    pub device: String,
    pub outbox: Outbox,
    pub last_seen: Instant,
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Phase {
    Rendezvous,
    Running,
    Finished,
    Failed(String),
}

pub(crate) struct Inner {
    pub phase: Phase,
    next_session: u64,
    pub sessions: BTreeMap<u64, Member>,
    generation: u64,
    /// Session ids by rank.
    ranks: Vec<u64>,
    /// Reports of uncommitted steps, by step, by rank.
    reports: BTreeMap<u64, Vec<Option<pb::StepReport>>>,
    /// Steps committed so far (the next step to commit).
    committed: u64,
    checkpoint: Option<u64>,
}

/// State shared by the service handlers and the driver.
pub(crate) struct Shared {
    pub settings: Settings,
    pub store: Arc<dyn RunStore>,
    inner: Mutex<Inner>,
    /// Signalled on every change the driver may wait for.
    pub changed: Notify,
}

/// Most loss terms a report may carry, and the longest name.
const MAX_TERMS: usize = 64;
const MAX_NAME: usize = 64;
/// How far past the last committed step a report may be: ranks run in lockstep, so only a
/// lagging report stream puts them apart; the bound keeps uncommitted reports finite.
const MAX_AHEAD: u64 = 4096;

fn stop(reason: &str, failed: bool) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Stop(pb::Stop {
            reason: reason.to_string(),
            failed,
        })),
    }
}

/// Equal strings, compared in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn valid_worker_id(id: &str) -> bool {
    (1..=253).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Shared {
    pub fn new(settings: Settings, store: Arc<dyn RunStore>) -> Self {
        Shared {
            settings,
            store,
            inner: Mutex::new(Inner {
                phase: Phase::Rendezvous,
                next_session: 1,
                sessions: BTreeMap::new(),
                generation: 0,
                ranks: Vec::new(),
                reports: BTreeMap::new(),
                committed: 0,
                checkpoint: None,
            }),
            changed: Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a worker or says why not. Returns its session id.
    pub fn join(&self, join: &pb::Join, outbox: Outbox) -> Result<u64, Status> {
        let s = &self.settings;
        if !same_secret(&join.token, &s.token) {
            return Err(Status::unauthenticated(
                "wrong token: the worker's --token (ELBO_TOKEN) differs from the coordinator's",
            ));
        }
        if join.run_id != s.run_id {
            return Err(Status::failed_precondition(format!(
                "run id {:?}, but this coordinator runs {:?}",
                join.run_id, s.run_id
            )));
        }
        if !join.config_sha256.is_empty() && join.config_sha256 != s.config_sha256 {
            return Err(Status::failed_precondition(format!(
                "config hash {} differs from the run's {}: start the worker with the coordinator's config, or without --config to receive it",
                join.config_sha256, s.config_sha256
            )));
        }
        if !valid_worker_id(&join.worker_id) {
            return Err(Status::invalid_argument(format!(
                "worker id {:?}: expected 1–253 characters of A–Z, a–z, 0–9, '-', '_', '.'",
                join.worker_id
            )));
        }
        let peer: SocketAddr = join.peer_address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "peer address {:?}: expected IP:port",
                join.peer_address
            ))
        })?;
        if join.device.is_empty() || join.device.len() > 32 {
            return Err(Status::invalid_argument(format!(
                "device {:?}: expected cpu or cuda:N",
                join.device
            )));
        }
        let mut inner = self.lock();
        if inner
            .sessions
            .values()
            .any(|m| m.worker_id == join.worker_id)
        {
            return Err(Status::already_exists(format!(
                "worker id {:?} is already in the run",
                join.worker_id
            )));
        }
        if inner.phase != Phase::Rendezvous {
            return Err(Status::failed_precondition(
                "the run has already started (or ended); it admits no new workers",
            ));
        }
        if inner.sessions.len() >= s.workers as usize {
            return Err(Status::resource_exhausted(format!(
                "the run already has its {} workers",
                s.workers
            )));
        }
        let id = inner.next_session;
        inner.next_session += 1;
        // Welcome goes first, under the lock: the ring may form as soon as the member is in.
        let welcome = pb::Welcome {
            session: id,
            config_toml: s.config_toml.clone(),
            config_sha256: s.config_sha256.clone(),
            heartbeat_interval_ms: (s.heartbeat_timeout.as_millis() / 4).clamp(10, 5_000) as u32,
        };
        outbox
            .send(Ok(pb::Command {
                kind: Some(pb::command::Kind::Welcome(welcome)),
            }))
            .map_err(|_| Status::cancelled("the session closed while joining"))?;
        inner.sessions.insert(
            id,
            Member {
                worker_id: join.worker_id.clone(),
                peer,
                device: join.device.clone(),
                outbox,
                last_seen: Instant::now(),
            },
        );
        drop(inner);
        tracing::info!(worker = %join.worker_id, %peer, device = %join.device, "worker joined");
        self.changed.notify_one();
        Ok(id)
    }

    /// A heartbeat (or any message) from a session.
    pub fn seen(&self, session: u64) {
        if let Some(m) = self.lock().sessions.get_mut(&session) {
            m.last_seen = Instant::now();
        }
    }

    /// A session's stream ended.
    pub fn left(&self, session: u64, why: &str) {
        let mut inner = self.lock();
        let rank = inner.ranks.iter().position(|s| *s == session);
        let Some(member) = inner.sessions.get(&session) else {
            return;
        };
        let who = member.worker_id.clone();
        match (&inner.phase, rank) {
            (Phase::Running, Some(rank)) => {
                drop(inner);
                self.fail(format!("worker {who} (rank {rank}) left the run: {why}"));
            }
            (Phase::Rendezvous, _) => {
                inner.sessions.remove(&session);
                tracing::info!(worker = %who, why, "worker left before the run started");
            }
            _ => {}
        }
    }

    /// Fails the run (once): every worker is told to stop.
    pub fn fail(&self, reason: String) {
        let mut inner = self.lock();
        if matches!(inner.phase, Phase::Finished | Phase::Failed(_)) {
            return;
        }
        tracing::error!(reason = %reason, "the run failed");
        for m in inner.sessions.values() {
            let _ = m.outbox.send(Ok(stop(&reason, true)));
        }
        inner.phase = Phase::Failed(reason);
        drop(inner);
        self.changed.notify_one();
    }

    /// Forms the first generation from the joined workers, ranked by worker id.
    pub fn start(&self) -> Result<(), String> {
        let s = &self.settings;
        let mut inner = self.lock();
        if inner.phase != Phase::Rendezvous {
            return Ok(());
        }
        let mut members: Vec<(&u64, &Member)> = inner.sessions.iter().collect();
        members.sort_by(|a, b| a.1.worker_id.cmp(&b.1.worker_id));
        let ranks: Vec<u64> = members.iter().map(|(id, _)| **id).collect();
        let peers: Vec<String> = members.iter().map(|(_, m)| m.peer.to_string()).collect();
        let workers: Vec<(String, SocketAddr, String)> = members
            .iter()
            .map(|(_, m)| (m.worker_id.clone(), m.peer, m.device.clone()))
            .collect();
        let world = ranks.len() as u32;
        let generation = inner.generation + 1;
        let checkpoint: Vec<pb::File> = s
            .checkpoint
            .iter()
            .flatten()
            .map(|(name, data)| pb::File {
                name: name.clone(),
                data: data.clone(),
            })
            .collect();
        for (rank, id) in ranks.iter().enumerate() {
            let start = pb::Start {
                generation,
                rank: rank as u32,
                world,
                peers: peers.clone(),
                stop_step: s.stop_step,
                checksum_every: s.checksum_every,
                checkpoint_every: s.checkpoint_every,
                checkpoint: checkpoint.clone(),
            };
            let command = pb::Command {
                kind: Some(pb::command::Kind::Start(start)),
            };
            if inner.sessions[id].outbox.send(Ok(command)).is_err() {
                return Err(format!(
                    "worker {} left while the ring was formed",
                    inner.sessions[id].worker_id
                ));
            }
        }
        tracing::info!(generation, world, ?workers, "ring formed");
        inner.generation = generation;
        inner.ranks = ranks;
        inner.committed = s.start_step;
        inner.phase = Phase::Running;
        Ok(())
    }

    /// Workers silent for longer than the heartbeat timeout, as a failure reason.
    pub fn silent(&self) -> Option<String> {
        let inner = self.lock();
        let limit = self.settings.heartbeat_timeout;
        inner.sessions.values().find_map(|m| {
            let quiet = m.last_seen.elapsed();
            (quiet > limit).then(|| {
                format!(
                    "worker {} sent no heartbeat for {:.1} s (cluster.heartbeat_timeout_s = {})",
                    m.worker_id,
                    quiet.as_secs_f64(),
                    limit.as_secs_f64()
                )
            })
        })
    }

    fn rank_of(&self, inner: &Inner, session: u64, generation: u64) -> Result<usize, Status> {
        if !inner.sessions.contains_key(&session) {
            return Err(Status::not_found(format!("unknown session {session}")));
        }
        if generation != inner.generation {
            tracing::warn!(
                session,
                generation,
                current = inner.generation,
                "refused a message of a stale generation"
            );
            return Err(Status::failed_precondition(format!(
                "message of stale generation {generation}: the run is in generation {}",
                inner.generation
            )));
        }
        if inner.phase != Phase::Running {
            return Err(Status::failed_precondition("the run is not training"));
        }
        inner
            .ranks
            .iter()
            .position(|s| *s == session)
            .ok_or_else(|| Status::failed_precondition("this session has no rank in the ring"))
    }

    /// A step report; commits every step all ranks have reported, in order.
    pub fn report(&self, report: pb::StepReport) -> Result<(), Status> {
        let mut inner = self.lock();
        let rank = self.rank_of(&inner, report.session, report.generation)?;
        let step = report.step;
        let end = self
            .settings
            .stop_step
            .min(inner.committed.saturating_add(MAX_AHEAD));
        if step < inner.committed || step >= end {
            return Err(Status::invalid_argument(format!(
                "step {step} is outside the uncommitted steps [{}, {end})",
                inner.committed
            )));
        }
        if report.terms.len() > MAX_TERMS
            || report
                .terms
                .iter()
                .any(|t| t.name.is_empty() || t.name.len() > MAX_NAME)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_TERMS} loss terms with names of 1–{MAX_NAME} bytes"
            )));
        }
        let world = inner.ranks.len();
        let slot = inner
            .reports
            .entry(step)
            .or_insert_with(|| vec![None; world]);
        if slot[rank].is_some() {
            return Err(Status::invalid_argument(format!(
                "rank {rank} already reported step {step}"
            )));
        }
        slot[rank] = Some(report);
        let mut failure = None;
        loop {
            let next = inner.committed;
            let ready = inner
                .reports
                .get(&next)
                .is_some_and(|r| r.iter().all(Option::is_some));
            if !ready {
                break;
            }
            let reports: Vec<pb::StepReport> = inner
                .reports
                .remove(&next)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            let committed = match self.commit(&reports) {
                Ok(c) => c,
                Err(reason) => {
                    failure = Some(reason);
                    break;
                }
            };
            inner.committed = next + 1;
            if let Err(e) = self.store.committed(&committed) {
                failure = Some(format!("cannot record step {next}: {e}"));
                break;
            }
        }
        let finished = self.finish_if_done(&mut inner);
        drop(inner);
        if let Some(reason) = failure {
            self.fail(reason);
        } else if finished {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Checks the ranks agree on a step and merges their reports.
    fn commit(&self, reports: &[pb::StepReport]) -> Result<CommittedStep, String> {
        let first = &reports[0];
        let step = first.step;
        if self.settings.checksum_every > 0 && (step + 1) % self.settings.checksum_every == 0 {
            for (rank, r) in reports.iter().enumerate() {
                match r.checksum {
                    None => {
                        return Err(format!(
                            "rank {rank} reported no parameter checksum at step {step}"
                        ))
                    }
                    Some(c) if Some(c) != first.checksum => {
                        return Err(format!(
                            "replicas diverged at step {step}: rank 0's parameter checksum is {:016x}, rank {rank}'s {c:016x}",
                            first.checksum.unwrap_or_default()
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        // Bitwise: a skipped (non-finite) step carries NaN terms, equal on every replica.
        let bits = |r: &pb::StepReport| -> Vec<(String, u64)> {
            r.terms
                .iter()
                .map(|t| (t.name.clone(), t.value.to_bits()))
                .collect()
        };
        let first_bits = bits(first);
        for (rank, r) in reports.iter().enumerate() {
            let same = bits(r) == first_bits
                && r.applied == first.applied
                && (r.epoch, r.step_in_epoch) == (first.epoch, first.step_in_epoch);
            if !same {
                return Err(format!(
                    "replicas diverged at step {step}: rank {rank} reports other loss terms or another data cursor than rank 0"
                ));
            }
        }
        let slowest = |f: fn(&pb::StepReport) -> f64| {
            let secs = reports.iter().map(f).fold(0.0, f64::max);
            std::time::Duration::from_secs_f64(if secs.is_finite() { secs.max(0.0) } else { 0.0 })
        };
        Ok(CommittedStep {
            step,
            epoch: first.epoch,
            step_in_epoch: first.step_in_epoch,
            terms: first
                .terms
                .iter()
                .map(|t| (t.name.clone(), t.value))
                .collect(),
            grad_norm: first.grad_norm,
            lr: first.lr,
            applied: first.applied,
            rows: reports.iter().map(|r| r.rows).sum(),
            world: reports.len() as u32,
            timings: StepTimings {
                data: slowest(|r| r.data_s),
                compute: slowest(|r| r.compute_s),
                reduce: slowest(|r| r.reduce_s),
                update: slowest(|r| r.update_s),
            },
        })
    }

    /// Checks a checkpoint upload; returns the step it holds.
    pub fn check_upload(&self, upload: &pb::CheckpointUpload) -> Result<u64, Status> {
        let inner = self.lock();
        let rank = self.rank_of(&inner, upload.session, upload.generation)?;
        if rank != 0 {
            return Err(Status::permission_denied(format!(
                "rank {rank} sent a checkpoint; only rank 0 does"
            )));
        }
        if upload.step == 0 || upload.step > self.settings.stop_step {
            return Err(Status::invalid_argument(format!(
                "checkpoint of step {}: expected a step in [1, {}]",
                upload.step, self.settings.stop_step
            )));
        }
        let bad_name =
            |n: &str| n.is_empty() || n.len() > 64 || n.contains(['/', '\\']) || n.starts_with('.');
        if upload.files.is_empty()
            || upload.files.len() > 16
            || upload.files.iter().any(|f| bad_name(&f.name))
        {
            return Err(Status::invalid_argument(
                "a checkpoint is 1–16 files with plain names",
            ));
        }
        Ok(upload.step)
    }

    /// A checkpoint of `step` is durable.
    pub fn saved(&self, step: u64) {
        let mut inner = self.lock();
        inner.checkpoint = inner.checkpoint.max(Some(step));
        let finished = self.finish_if_done(&mut inner);
        drop(inner);
        if finished {
            self.changed.notify_one();
        }
    }

    /// Finishes the run once every step is committed and the last one checkpointed.
    fn finish_if_done(&self, inner: &mut Inner) -> bool {
        let stop_step = self.settings.stop_step;
        if inner.phase != Phase::Running
            || inner.committed < stop_step
            || inner.checkpoint != Some(stop_step)
        {
            return false;
        }
        inner.phase = Phase::Finished;
        for m in inner.sessions.values() {
            let _ = m.outbox.send(Ok(stop("the run finished", false)));
        }
        true
    }

    /// The phase, and a summary.
    pub fn outcome(&self) -> (Phase, Summary) {
        let inner = self.lock();
        let summary = Summary {
            steps: inner.committed,
            world: inner.ranks.len() as u32,
            generation: inner.generation,
            checkpoint: inner.checkpoint,
        };
        (inner.phase.clone(), summary)
    }

    /// Ends every session's command stream.
    pub fn close_sessions(&self) {
        self.lock().sessions.clear();
    }
}
