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
    /// The newest generation it says it has been in.
    last_generation: u64,
    /// Global steps it is known to have taken (`None`: not known, e.g. it just joined).
    step: Option<u64>,
    /// It has halted in the current generation.
    halted: bool,
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Phase {
    /// Waiting for workers: before the first generation, or after a halt left too few.
    Rendezvous,
    /// A generation is training.
    Running,
    /// `Halt` was sent; waiting for every rank of the generation to halt at a step boundary.
    Halting,
    /// `SendState` was sent to a donor; waiting for its state.
    Handover,
    Finished,
    Failed(String),
}

pub(crate) struct Inner {
    pub phase: Phase,
    next_session: u64,
    pub sessions: BTreeMap<u64, Member>,
    generation: u64,
    /// Session ids by rank, of the current (or last) generation.
    ranks: Vec<u64>,
    /// Reports of uncommitted steps, by step, by rank.
    reports: BTreeMap<u64, Vec<Option<pb::StepReport>>>,
    /// Steps committed so far (the next step to commit).
    committed: u64,
    checkpoint: Option<u64>,
    /// Why the current halt began, and when.
    halt: Option<(String, Instant)>,
    /// Stop with a checkpoint at the next step boundary instead of going on.
    draining: bool,
    /// The state (checkpoint files) of step `state_step`, for workers that need it.
    state: Option<(u64, crate::Files)>,
    /// The donor asked for its state, and when.
    donor: Option<(u64, Instant)>,
    /// When the current rendezvous gives up.
    rendezvous_deadline: Instant,
}

/// State shared by the service handlers and the driver.
pub(crate) struct Shared {
    pub settings: Settings,
    pub store: Arc<dyn RunStore>,
    inner: Mutex<Inner>,
    /// Signalled on every change the driver may wait for.
    pub changed: Notify,
}

/// What a checkpoint upload is.
pub(crate) enum Upload {
    /// Rank 0's periodic (or final) checkpoint: written to the run directory.
    Periodic(u64),
    /// A donor's state: written when `persist`, handed to the workers that need it.
    Handover { step: u64, persist: bool },
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

fn command(kind: pb::command::Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

fn to_pb_files(files: &crate::Files) -> Vec<pb::File> {
    files
        .iter()
        .map(|(name, data)| pb::File {
            name: name.clone(),
            data: data.clone(),
        })
        .collect()
}

impl Shared {
    pub fn new(settings: Settings, store: Arc<dyn RunStore>) -> Self {
        let state = settings
            .checkpoint
            .clone()
            .map(|files| (settings.start_step, files));
        Shared {
            inner: Mutex::new(Inner {
                phase: Phase::Rendezvous,
                next_session: 1,
                sessions: BTreeMap::new(),
                generation: 0,
                ranks: Vec::new(),
                reports: BTreeMap::new(),
                committed: settings.start_step,
                checkpoint: None,
                halt: None,
                draining: false,
                state,
                donor: None,
                rendezvous_deadline: Instant::now() + settings.rendezvous_timeout,
            }),
            settings,
            store,
            changed: Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a worker or says why not. Returns its session id. A worker that joins a running
    /// generation with room to spare halts it: the next generation takes the newcomer in.
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
        if matches!(inner.phase, Phase::Finished | Phase::Failed(_)) || inner.draining {
            return Err(Status::failed_precondition(
                "the run has ended (or is stopping); it admits no new workers",
            ));
        }
        if inner.sessions.len() >= s.workers as usize {
            return Err(Status::resource_exhausted(format!(
                "the run already has its {} workers (cluster.workers)",
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
            .send(Ok(command(pb::command::Kind::Welcome(welcome))))
            .map_err(|_| Status::cancelled("the session closed while joining"))?;
        inner.sessions.insert(
            id,
            Member {
                worker_id: join.worker_id.clone(),
                peer,
                device: join.device.clone(),
                outbox,
                last_seen: Instant::now(),
                last_generation: join.last_generation,
                step: None,
                halted: false,
            },
        );
        tracing::info!(worker = %join.worker_id, %peer, device = %join.device, "worker joined");
        if inner.phase == Phase::Running {
            self.begin_halt(
                &mut inner,
                format!("worker {} joins the run", join.worker_id),
            );
        }
        drop(inner);
        self.changed.notify_one();
        Ok(id)
    }

    /// A heartbeat (or any message) from a session.
    pub fn seen(&self, session: u64) {
        if let Some(m) = self.lock().sessions.get_mut(&session) {
            m.last_seen = Instant::now();
        }
    }

    /// A worker is gone (its session ended, it went silent, or it did not do what it was told
    /// in time): it leaves the run, and a generation it was in is halted and re-formed without it.
    pub fn left(&self, session: u64, why: &str) {
        let mut inner = self.lock();
        let Some(member) = inner.sessions.remove(&session) else {
            return;
        };
        let who = member.worker_id;
        let rank = inner.ranks.iter().position(|s| *s == session);
        if matches!(inner.phase, Phase::Finished | Phase::Failed(_)) {
            tracing::debug!(worker = %who, why, "worker left after the run ended");
            return;
        }
        tracing::warn!(worker = %who, ?rank, why, "worker lost");
        match (&inner.phase, rank) {
            (Phase::Running, Some(rank)) => {
                let reason = format!("worker {who} (rank {rank}) was lost: {why}");
                self.begin_halt(&mut inner, reason);
            }
            (Phase::Halting, Some(_)) => self.check_halted(&mut inner),
            (Phase::Handover, _) if inner.donor.is_some_and(|(d, _)| d == session) => {
                inner.donor = None;
                self.after_halt(&mut inner);
            }
            _ => {}
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// Fails the run (once): every worker is told to stop.
    pub fn fail(&self, reason: String) {
        let mut inner = self.lock();
        self.fail_locked(&mut inner, reason);
        drop(inner);
        self.changed.notify_one();
    }

    fn fail_locked(&self, inner: &mut Inner, reason: String) {
        if matches!(inner.phase, Phase::Finished | Phase::Failed(_)) {
            return;
        }
        tracing::error!(reason = %reason, "the run failed");
        for m in inner.sessions.values() {
            let _ = m.outbox.send(Ok(stop(&reason, true)));
        }
        inner.phase = Phase::Failed(reason);
    }

    /// Stops the run at the next step boundary with a checkpoint there (SIGTERM, Ctrl-C).
    pub fn drain(&self, reason: &str) {
        let mut inner = self.lock();
        if matches!(inner.phase, Phase::Finished | Phase::Failed(_)) || inner.draining {
            return;
        }
        tracing::warn!(
            reason,
            "stopping at the next step boundary with a checkpoint"
        );
        inner.draining = true;
        match inner.phase {
            Phase::Running => self.begin_halt(&mut inner, reason.to_string()),
            Phase::Rendezvous => self.after_halt(&mut inner),
            _ => {}
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// A worker cannot go on: the run fails with its reason.
    pub fn worker_failed(&self, session: u64, reason: &str) -> Result<(), Status> {
        let who = self
            .lock()
            .sessions
            .get(&session)
            .map(|m| m.worker_id.clone())
            .ok_or_else(|| Status::not_found(format!("unknown session {session}")))?;
        let reason: String = reason.chars().take(2000).collect();
        self.fail(format!("worker {who} failed: {reason}"));
        Ok(())
    }

    /// Aborts the running generation: every rank is told to halt at a step boundary.
    fn begin_halt(&self, inner: &mut Inner, reason: String) {
        if inner.phase != Phase::Running {
            return;
        }
        tracing::warn!(generation = inner.generation, reason = %reason, "halting the generation");
        inner.phase = Phase::Halting;
        inner.halt = Some((reason, Instant::now()));
        let halt = command(pb::command::Kind::Halt(pb::Halt {
            generation: inner.generation,
        }));
        let ranks = inner.ranks.clone();
        for id in ranks {
            if let Some(m) = inner.sessions.get_mut(&id) {
                if !m.halted {
                    let _ = m.outbox.send(Ok(halt.clone()));
                }
            }
        }
        self.check_halted(inner);
    }

    /// A worker has halted at a step boundary.
    pub fn halted(&self, h: &pb::Halted) -> Result<(), Status> {
        let mut inner = self.lock();
        if h.generation < inner.generation && inner.sessions.contains_key(&h.session) {
            return Ok(());
        }
        let rank = self.rank_of(&inner, h.session, h.generation)?;
        if h.step < inner.committed || h.step > self.settings.stop_step {
            return Err(Status::invalid_argument(format!(
                "halted at step {}, outside [{}, {}]",
                h.step, inner.committed, self.settings.stop_step
            )));
        }
        if let Some(m) = inner.sessions.get_mut(&h.session) {
            m.step = Some(h.step);
            m.halted = true;
        }
        if inner.phase == Phase::Running {
            let reason = format!("rank {rank}'s ring broke at step {}", h.step);
            self.begin_halt(&mut inner, reason);
        } else {
            self.check_halted(&mut inner);
        }
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Moves on once every rank still in the run has halted.
    fn check_halted(&self, inner: &mut Inner) {
        if inner.phase != Phase::Halting {
            return;
        }
        let all = inner
            .ranks
            .iter()
            .filter_map(|id| inner.sessions.get(id))
            .all(|m| m.halted);
        if all {
            self.after_halt(inner);
        }
    }

    /// Every surviving rank stands at a step boundary: the furthest of them defines the run's
    /// state. Steps before it are committed, and the run either stops there (with a checkpoint)
    /// or re-forms the ring.
    fn after_halt(&self, inner: &mut Inner) {
        let survivors: Vec<(u64, u64)> = inner
            .ranks
            .iter()
            .filter_map(|id| Some((*id, inner.sessions.get(id)?.step?)))
            .collect();
        let furthest = survivors.iter().map(|(_, step)| *step).max();
        let reached = match furthest {
            Some(step) => step,
            None if inner.generation == 0 => inner.committed,
            None => {
                let reason = inner
                    .halt
                    .as_ref()
                    .map_or("", |(r, _)| r.as_str())
                    .to_string();
                return self.fail_locked(
                    inner,
                    format!(
                        "every worker of generation {} was lost ({reason}); run again to resume from the newest checkpoint",
                        inner.generation
                    ),
                );
            }
        };
        if reached < inner.committed {
            return self.fail_locked(
                inner,
                format!(
                    "the state of step {} was lost with the workers that held it; run again to resume from the newest checkpoint",
                    inner.committed
                ),
            );
        }
        while inner.committed < reached {
            let step = inner.committed;
            let reports: Vec<pb::StepReport> = inner
                .reports
                .remove(&step)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            if reports.is_empty() {
                return self
                    .fail_locked(inner, format!("step {step} was taken but never reported"));
            }
            let world = inner.ranks.len() as u32;
            let committed = match self.commit(&reports, world) {
                Ok(c) => c,
                Err(reason) => return self.fail_locked(inner, reason),
            };
            inner.committed = step + 1;
            if let Err(e) = self.store.committed(&committed) {
                return self.fail_locked(inner, format!("cannot record step {step}: {e}"));
            }
        }
        inner.reports.clear();
        let stop_here = inner.draining || inner.committed >= self.settings.stop_step;
        if stop_here && inner.checkpoint == Some(inner.committed) {
            return self.finish(inner, "stopped with a checkpoint");
        }
        if stop_here && survivors.is_empty() {
            // Nothing was trained since the last checkpoint (or ever): nothing to save.
            return self.finish(inner, "stopped before training");
        }
        if stop_here {
            return self.ask_donor(inner, true);
        }
        inner.phase = Phase::Rendezvous;
        inner.rendezvous_deadline = Instant::now() + self.settings.rendezvous_timeout;
        self.try_form(inner);
    }

    /// Asks the first rank that holds the committed state to send it.
    fn ask_donor(&self, inner: &mut Inner, persist: bool) {
        let committed = inner.committed;
        let donor = inner
            .ranks
            .iter()
            .chain(inner.sessions.keys())
            .find(|id| {
                inner
                    .sessions
                    .get(id)
                    .is_some_and(|m| m.step == Some(committed))
            })
            .copied();
        let Some(donor) = donor else {
            return self.fail_locked(
                inner,
                format!("no worker holds the state of step {committed}"),
            );
        };
        let ask = command(pb::command::Kind::SendState(pb::SendState {
            generation: inner.generation,
            persist,
        }));
        if inner.sessions[&donor].outbox.send(Ok(ask)).is_err() {
            inner.sessions.remove(&donor);
            return self.after_halt(inner);
        }
        tracing::info!(worker = %inner.sessions[&donor].worker_id, step = committed, persist, "asking for the state");
        inner.donor = Some((donor, Instant::now()));
        inner.phase = Phase::Handover;
    }

    /// Forms the next generation from the joined workers, ranked by worker id, if there are
    /// enough: the first one waits for `cluster.workers` (or `cluster.min_workers` after the
    /// rendezvous timeout); later ones go on with whoever is there, at least `min_workers`.
    pub fn try_form(&self, inner: &mut Inner) {
        let s = &self.settings;
        if inner.phase != Phase::Rendezvous {
            return;
        }
        let joined = inner.sessions.len() as u32;
        let timed_out = Instant::now() >= inner.rendezvous_deadline;
        let enough =
            joined >= s.workers || (joined >= s.min_workers && (timed_out || inner.generation > 0));
        if !enough {
            if timed_out {
                let what = if inner.generation == 0 {
                    "joined"
                } else {
                    "remain or rejoined"
                };
                self.fail_locked(
                    inner,
                    format!(
                        "only {joined} of at least {} workers (cluster.min_workers) {what} within {:.0} s (cluster.rendezvous_timeout_s)",
                        s.min_workers,
                        s.rendezvous_timeout.as_secs_f64()
                    ),
                );
            }
            return;
        }
        let committed = inner.committed;
        let needs_state = |m: &Member| m.step != Some(committed);
        let have_state = inner
            .state
            .as_ref()
            .is_some_and(|(step, _)| *step == committed);
        if committed > 0 && !have_state && inner.sessions.values().any(needs_state) {
            return self.ask_donor(inner, false);
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
        let generation = members
            .iter()
            .map(|(_, m)| m.last_generation)
            .fold(inner.generation, u64::max)
            + 1;
        let files = inner
            .state
            .as_ref()
            .filter(|(step, _)| *step == committed)
            .map(|(_, files)| to_pb_files(files))
            .unwrap_or_default();
        let mut lost = Vec::new();
        for (rank, id) in ranks.iter().enumerate() {
            let m = &inner.sessions[id];
            let start = pb::Start {
                generation,
                rank: rank as u32,
                world,
                peers: peers.clone(),
                stop_step: s.stop_step,
                checksum_every: s.checksum_every,
                checkpoint_every: s.checkpoint_every,
                checkpoint: if needs_state(m) {
                    files.clone()
                } else {
                    Vec::new()
                },
                start_step: committed,
            };
            if m.outbox
                .send(Ok(command(pb::command::Kind::Start(start))))
                .is_err()
            {
                lost.push(*id);
            }
        }
        tracing::info!(generation, world, step = committed, ?workers, "ring formed");
        inner.generation = generation;
        inner.ranks = ranks;
        for m in inner.sessions.values_mut() {
            m.step = Some(committed);
            m.halted = false;
        }
        inner.halt = None;
        inner.phase = Phase::Running;
        for id in lost {
            if let Some(m) = inner.sessions.remove(&id) {
                let reason = format!("worker {} left while the ring formed", m.worker_id);
                self.begin_halt(inner, reason);
            }
        }
    }

    /// Called by the driver: sessions silent for longer than the heartbeat timeout, and workers
    /// that did not halt or hand over in time (`cluster.step_timeout_s`), with why.
    pub fn overdue(&self) -> Vec<(u64, String)> {
        let inner = self.lock();
        let limit = self.settings.heartbeat_timeout;
        let mut out: Vec<(u64, String)> = inner
            .sessions
            .iter()
            .filter(|(_, m)| m.last_seen.elapsed() > limit)
            .map(|(id, m)| {
                (
                    *id,
                    format!(
                        "no heartbeat for {:.1} s (cluster.heartbeat_timeout_s = {})",
                        m.last_seen.elapsed().as_secs_f64(),
                        limit.as_secs_f64()
                    ),
                )
            })
            .collect();
        let patience = self.settings.step_timeout;
        if let (Phase::Halting, Some((_, since))) = (&inner.phase, &inner.halt) {
            if since.elapsed() > patience {
                out.extend(
                    inner
                        .ranks
                        .iter()
                        .filter(|id| inner.sessions.get(id).is_some_and(|m| !m.halted))
                        .map(|id| (*id, format!("did not halt within {patience:?}"))),
                );
            }
        }
        if let (Phase::Handover, Some((donor, since))) = (&inner.phase, inner.donor) {
            if since.elapsed() > patience {
                out.push((donor, format!("did not send its state within {patience:?}")));
            }
        }
        out
    }

    /// The rendezvous, from the driver: forms a generation once there are enough workers.
    pub fn rendezvous(&self) {
        let mut inner = self.lock();
        self.try_form(&mut inner);
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
        if !matches!(
            inner.phase,
            Phase::Running | Phase::Halting | Phase::Handover
        ) {
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
            let committed = match self.commit(&reports, world as u32) {
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
        if let Some(reason) = failure {
            self.fail_locked(&mut inner, reason);
        } else {
            self.finish_if_done(&mut inner);
        }
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Checks the reporting ranks agree on a step and merges their reports.
    fn commit(&self, reports: &[pb::StepReport], world: u32) -> Result<CommittedStep, String> {
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
                && r.global_rows == first.global_rows
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
            rows: first.global_rows,
            world,
            timings: StepTimings {
                data: slowest(|r| r.data_s),
                compute: slowest(|r| r.compute_s),
                reduce: slowest(|r| r.reduce_s),
                update: slowest(|r| r.update_s),
            },
        })
    }

    /// Checks a checkpoint upload and says what it is.
    pub fn check_upload(&self, upload: &pb::CheckpointUpload) -> Result<Upload, Status> {
        let inner = self.lock();
        let rank = self.rank_of(&inner, upload.session, upload.generation)?;
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
        if upload.requested {
            let asked = inner.phase == Phase::Handover
                && inner.donor.is_some_and(|(d, _)| d == upload.session);
            if !asked {
                return Err(Status::failed_precondition(
                    "this worker was not asked for its state",
                ));
            }
            if upload.step != inner.committed {
                return Err(Status::invalid_argument(format!(
                    "state of step {}, but step {} was asked for",
                    upload.step, inner.committed
                )));
            }
            return Ok(Upload::Handover {
                step: upload.step,
                persist: inner.draining || inner.committed >= self.settings.stop_step,
            });
        }
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
        Ok(Upload::Periodic(upload.step))
    }

    /// A checkpoint of `step` is durable.
    pub fn saved(&self, step: u64) {
        let mut inner = self.lock();
        inner.checkpoint = inner.checkpoint.max(Some(step));
        self.finish_if_done(&mut inner);
        drop(inner);
        self.changed.notify_one();
    }

    /// The donor's state arrived (and is durable, if it was to be written): the run stops
    /// there, or the next generation forms with it.
    pub fn handed_over(&self, step: u64, files: crate::Files) {
        let mut inner = self.lock();
        if inner.phase != Phase::Handover || step != inner.committed {
            return;
        }
        inner.donor = None;
        inner.state = Some((step, files));
        if inner.draining || step >= self.settings.stop_step {
            if inner.checkpoint == Some(step) {
                return self.finish(&mut inner, "stopped with a checkpoint");
            }
            // The stop came after this state was sent unwritten: ask for it again, to keep.
            return self.ask_donor(&mut inner, true);
        }
        inner.phase = Phase::Rendezvous;
        self.try_form(&mut inner);
        drop(inner);
        self.changed.notify_one();
    }

    /// Finishes the run once every step is committed and the last one checkpointed.
    fn finish_if_done(&self, inner: &mut Inner) {
        let stop_step = self.settings.stop_step;
        if inner.phase == Phase::Running
            && inner.committed >= stop_step
            && inner.checkpoint == Some(stop_step)
        {
            self.finish(inner, "the run finished");
        }
    }

    fn finish(&self, inner: &mut Inner, reason: &str) {
        inner.phase = Phase::Finished;
        for m in inner.sessions.values() {
            let _ = m.outbox.send(Ok(stop(reason, false)));
        }
        self.changed.notify_one();
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
