//! The coordinator's decisions: sessions, the rendezvous, generations, step commit, replica
//! checks, hand-overs and checkpoints, as a state machine with no I/O. Every transition is a
//! method of [`Run`] that takes the event and the time (`now`) and returns the [`Effect`]s to
//! carry out — commands to send, steps to record — in the style of torchft's
//! `quorum_compute`; the service (`service.rs`) feeds it events under one lock and carries the
//! effects out in order on a thread of their own. Tested in tables at the end of this file, with
//! hand-built states and synthetic time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use elbo_proto::auth::Secret;
use elbo_proto::v1 as pb;
use tonic::Status;

use crate::{CommittedStep, Settings, StepTimings, Summary};

/// What a transition asks the outside world to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Send a command to a worker's session.
    Send(u64, pb::Command),
    /// Record a committed step (metrics, progress); called in step order.
    Commit(CommittedStep),
    /// End a worker's command stream: it left the run (a worker that was only cut off then
    /// notices and joins again).
    Close(u64),
}

/// A joined worker.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub worker_id: String,
    pub peer: SocketAddr,
    pub device: String,
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

/// A run as the coordinator sees it.
#[derive(Clone)]
pub(crate) struct Run {
    pub settings: Settings,
    pub phase: Phase,
    pub next_session: u64,
    pub sessions: BTreeMap<u64, Member>,
    generation: u64,
    /// Session ids by rank, of the current (or last) generation.
    pub ranks: Vec<u64>,
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
    /// Sessions' credentials and generations' ring keys derive from it.
    secret: Secret,
}

/// What a checkpoint upload is.
#[derive(Debug)]
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

fn stop(reason: &str, failed: bool, resumable: bool) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Stop(pb::Stop {
            reason: reason.to_string(),
            failed,
            resumable,
        })),
    }
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

type Effects = Vec<Effect>;

impl Run {
    /// A run that starts its rendezvous at `now`, its credentials derived from `secret`.
    pub fn new(settings: Settings, secret: Secret, now: Instant) -> Self {
        let state = settings
            .checkpoint
            .clone()
            .map(|files| (settings.start_step, files));
        Run {
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
            rendezvous_deadline: now + settings.rendezvous_timeout,
            settings,
            secret,
        }
    }

    /// Admits a worker or says why not: its session id, and the effects (its `Welcome` first).
    /// A worker that joins a running generation halts it: the next generation takes it in. Its
    /// token was checked before its `Join` was read ([`crate::auth`]).
    pub fn join(&mut self, join: &pb::Join, now: Instant) -> Result<(u64, Effects), Status> {
        let s = &self.settings;
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
        if self
            .sessions
            .values()
            .any(|m| m.worker_id == join.worker_id)
        {
            return Err(Status::already_exists(format!(
                "worker id {:?} is already in the run",
                join.worker_id
            )));
        }
        if self.ended() || self.draining {
            return Err(Status::failed_precondition(
                "the run has ended (or is stopping); it admits no new workers",
            ));
        }
        if self.sessions.len() >= s.workers as usize {
            return Err(Status::resource_exhausted(format!(
                "the run already has its {} workers (cluster.workers)",
                s.workers
            )));
        }
        let id = self.next_session;
        self.next_session += 1;
        let welcome = pb::Welcome {
            session: id,
            config_toml: s.config_toml.clone(),
            config_sha256: s.config_sha256.clone(),
            heartbeat_interval_ms: (s.heartbeat_timeout.as_millis() / 4).clamp(10, 5_000) as u32,
            credential: self.secret.session_credential(id).as_bytes().to_vec(),
        };
        let mut fx = vec![Effect::Send(
            id,
            command(pb::command::Kind::Welcome(welcome)),
        )];
        self.sessions.insert(
            id,
            Member {
                worker_id: join.worker_id.clone(),
                peer,
                device: join.device.clone(),
                last_seen: now,
                last_generation: join.last_generation,
                step: None,
                halted: false,
            },
        );
        tracing::info!(worker = %join.worker_id, %peer, device = %join.device, "worker joined");
        if self.phase == Phase::Running {
            let reason = format!("worker {} joins the run", join.worker_id);
            self.begin_halt(reason, now, &mut fx);
        }
        Ok((id, fx))
    }

    /// Whether the run has finished or failed.
    pub fn ended(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::Failed(_))
    }

    /// A heartbeat (or any message) from a session.
    pub fn seen(&mut self, session: u64, now: Instant) {
        if let Some(m) = self.sessions.get_mut(&session) {
            m.last_seen = now;
        }
    }

    /// A worker is gone (its session ended, it went silent, or it did not do what it was told
    /// in time): it leaves the run, and a generation it was in is halted and re-formed without it.
    pub fn left(&mut self, session: u64, why: &str, now: Instant) -> Effects {
        let mut fx = Vec::new();
        let Some(member) = self.sessions.remove(&session) else {
            return fx;
        };
        fx.push(Effect::Close(session));
        let who = member.worker_id;
        let rank = self.ranks.iter().position(|s| *s == session);
        if self.ended() {
            tracing::debug!(worker = %who, why, "worker left after the run ended");
            return fx;
        }
        tracing::warn!(worker = %who, ?rank, why, "worker lost");
        match (&self.phase, rank) {
            (Phase::Running, Some(rank)) => {
                let reason = format!("worker {who} (rank {rank}) was lost: {why}");
                self.begin_halt(reason, now, &mut fx);
            }
            (Phase::Halting, Some(_)) => self.check_halted(now, &mut fx),
            (Phase::Handover, _) if self.donor.is_some_and(|(d, _)| d == session) => {
                self.donor = None;
                self.after_halt(now, &mut fx);
            }
            _ => {}
        }
        fx
    }

    /// Fails the run (once): every worker is told to stop.
    pub fn fail(&mut self, reason: String) -> Effects {
        let mut fx = Vec::new();
        self.fail_into(reason, &mut fx);
        fx
    }

    fn fail_into(&mut self, reason: String, fx: &mut Effects) {
        if self.ended() {
            return;
        }
        tracing::error!(reason = %reason, "the run failed");
        fx.extend(
            self.sessions
                .keys()
                .map(|id| Effect::Send(*id, stop(&reason, true, false))),
        );
        self.phase = Phase::Failed(reason);
    }

    /// Stops the run at the next step boundary with a checkpoint there (SIGTERM, Ctrl-C).
    pub fn drain(&mut self, reason: &str, now: Instant) -> Effects {
        let mut fx = Vec::new();
        if self.ended() || self.draining {
            return fx;
        }
        tracing::warn!(
            reason,
            "stopping at the next step boundary with a checkpoint"
        );
        self.draining = true;
        match self.phase {
            Phase::Running => self.begin_halt(reason.to_string(), now, &mut fx),
            Phase::Rendezvous => self.after_halt(now, &mut fx),
            _ => {}
        }
        fx
    }

    /// A worker cannot go on: the run fails with its reason.
    pub fn worker_failed(&mut self, session: u64, reason: &str) -> Result<Effects, Status> {
        let who = self
            .sessions
            .get(&session)
            .map(|m| m.worker_id.clone())
            .ok_or_else(|| Status::not_found(format!("unknown session {session}")))?;
        let reason: String = reason.chars().take(2000).collect();
        Ok(self.fail(format!("worker {who} failed: {reason}")))
    }

    /// Aborts the running generation: every rank is told to halt at a step boundary.
    fn begin_halt(&mut self, reason: String, now: Instant, fx: &mut Effects) {
        if self.phase != Phase::Running {
            return;
        }
        tracing::warn!(generation = self.generation, reason = %reason, "halting the generation");
        self.phase = Phase::Halting;
        self.halt = Some((reason, now));
        let halt = command(pb::command::Kind::Halt(pb::Halt {
            generation: self.generation,
        }));
        for id in &self.ranks {
            if self.sessions.get(id).is_some_and(|m| !m.halted) {
                fx.push(Effect::Send(*id, halt.clone()));
            }
        }
        self.check_halted(now, fx);
    }

    /// A worker has halted at a step boundary.
    pub fn halted(&mut self, h: &pb::Halted, now: Instant) -> Result<Effects, Status> {
        let mut fx = Vec::new();
        if h.generation < self.generation && self.sessions.contains_key(&h.session) {
            return Ok(fx);
        }
        let rank = self.rank_of(h.session, h.generation)?;
        if h.step < self.committed || h.step > self.settings.stop_step {
            return Err(Status::invalid_argument(format!(
                "halted at step {}, outside [{}, {}]",
                h.step, self.committed, self.settings.stop_step
            )));
        }
        if let Some(m) = self.sessions.get_mut(&h.session) {
            m.step = Some(h.step);
            m.halted = true;
        }
        if self.phase == Phase::Running {
            let reason = format!("rank {rank}'s ring broke at step {}", h.step);
            self.begin_halt(reason, now, &mut fx);
        } else {
            self.check_halted(now, &mut fx);
        }
        Ok(fx)
    }

    /// Moves on once every rank still in the run has halted.
    fn check_halted(&mut self, now: Instant, fx: &mut Effects) {
        if self.phase != Phase::Halting {
            return;
        }
        let all = self
            .ranks
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .all(|m| m.halted);
        if all {
            self.after_halt(now, fx);
        }
    }

    /// Every surviving rank stands at a step boundary: the furthest of them defines the run's
    /// state. Steps before it are committed, and the run either stops there (with a checkpoint)
    /// or re-forms the ring.
    fn after_halt(&mut self, now: Instant, fx: &mut Effects) {
        let survivors: Vec<(u64, u64)> = self
            .ranks
            .iter()
            .filter_map(|id| Some((*id, self.sessions.get(id)?.step?)))
            .collect();
        let furthest = survivors.iter().map(|(_, step)| *step).max();
        let reached = match furthest {
            Some(step) => step,
            None if self.generation == 0 => self.committed,
            None => {
                let reason = self
                    .halt
                    .as_ref()
                    .map_or("", |(r, _)| r.as_str())
                    .to_string();
                return self.fail_into(
                    format!(
                        "every worker of generation {} was lost ({reason}); run again to resume from the newest checkpoint",
                        self.generation
                    ),
                    fx,
                );
            }
        };
        if reached < self.committed {
            return self.fail_into(
                format!(
                    "the state of step {} was lost with the workers that held it; run again to resume from the newest checkpoint",
                    self.committed
                ),
                fx,
            );
        }
        while self.committed < reached {
            let step = self.committed;
            let reports: Vec<pb::StepReport> = self
                .reports
                .remove(&step)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            if reports.is_empty() {
                return self.fail_into(format!("step {step} was taken but never reported"), fx);
            }
            let world = self.ranks.len() as u32;
            match self.commit(&reports, world) {
                Ok(c) => fx.push(Effect::Commit(c)),
                Err(reason) => return self.fail_into(reason, fx),
            }
            self.committed = step + 1;
        }
        self.reports.clear();
        let stop_here = self.draining || self.committed >= self.settings.stop_step;
        if stop_here && self.checkpoint == Some(self.committed) {
            return self.finish("stopped with a checkpoint", fx);
        }
        if stop_here && survivors.is_empty() {
            // Nothing was trained since the last checkpoint (or ever): nothing to save.
            return self.finish("stopped before training", fx);
        }
        if stop_here {
            return self.ask_donor(true, now, fx);
        }
        self.phase = Phase::Rendezvous;
        self.rendezvous_deadline = now + self.settings.rendezvous_timeout;
        self.try_form(now, fx);
    }

    /// Asks the first rank that holds the committed state to send it.
    fn ask_donor(&mut self, persist: bool, now: Instant, fx: &mut Effects) {
        let committed = self.committed;
        let donor = self
            .ranks
            .iter()
            .chain(self.sessions.keys())
            .find(|id| {
                self.sessions
                    .get(id)
                    .is_some_and(|m| m.step == Some(committed))
            })
            .copied();
        let Some(donor) = donor else {
            return self.fail_into(format!("no worker holds the state of step {committed}"), fx);
        };
        let ask = command(pb::command::Kind::SendState(pb::SendState {
            generation: self.generation,
            persist,
        }));
        fx.push(Effect::Send(donor, ask));
        tracing::info!(worker = %self.sessions[&donor].worker_id, step = committed, persist, "asking for the state");
        self.donor = Some((donor, now));
        self.phase = Phase::Handover;
    }

    /// Forms the next generation from the joined workers, ranked by worker id, if there are
    /// enough: the first one waits for `cluster.workers` (or `cluster.min_workers` after the
    /// rendezvous timeout); later ones go on with whoever is there, at least `min_workers`.
    fn try_form(&mut self, now: Instant, fx: &mut Effects) {
        let s = &self.settings;
        if self.phase != Phase::Rendezvous {
            return;
        }
        let joined = self.sessions.len() as u32;
        let timed_out = now >= self.rendezvous_deadline;
        let enough =
            joined >= s.workers || (joined >= s.min_workers && (timed_out || self.generation > 0));
        if !enough {
            if timed_out {
                let what = if self.generation == 0 {
                    "joined"
                } else {
                    "remain or rejoined"
                };
                let reason = format!(
                    "only {joined} of at least {} workers (cluster.min_workers) {what} within {:.0} s (cluster.rendezvous_timeout_s)",
                    s.min_workers,
                    s.rendezvous_timeout.as_secs_f64()
                );
                self.fail_into(reason, fx);
            }
            return;
        }
        let committed = self.committed;
        let needs_state = |m: &Member| m.step != Some(committed);
        let have_state = self
            .state
            .as_ref()
            .is_some_and(|(step, _)| *step == committed);
        if committed > 0 && !have_state && self.sessions.values().any(needs_state) {
            return self.ask_donor(false, now, fx);
        }
        let mut members: Vec<(&u64, &Member)> = self.sessions.iter().collect();
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
            .fold(self.generation, u64::max)
            + 1;
        let files = self
            .state
            .as_ref()
            .filter(|(step, _)| *step == committed)
            .map(|(_, files)| to_pb_files(files))
            .unwrap_or_default();
        let ring_key = self.secret.ring_key(generation).as_bytes().to_vec();
        for (rank, id) in ranks.iter().enumerate() {
            let m = &self.sessions[id];
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
                ring_key: ring_key.clone(),
            };
            fx.push(Effect::Send(*id, command(pb::command::Kind::Start(start))));
        }
        tracing::info!(generation, world, step = committed, ?workers, "ring formed");
        self.generation = generation;
        self.ranks = ranks;
        for m in self.sessions.values_mut() {
            m.step = Some(committed);
            m.halted = false;
        }
        self.halt = None;
        self.phase = Phase::Running;
    }

    /// The passage of time: forms a generation once there are enough workers (or fails the
    /// rendezvous when it times out), and drops sessions silent for longer than the heartbeat
    /// timeout and workers that did not halt or hand over within `cluster.step_timeout_s`.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut fx = Vec::new();
        self.try_form(now, &mut fx);
        for (session, why) in self.overdue(now) {
            fx.extend(self.left(session, &why, now));
        }
        fx
    }

    /// Sessions that are overdue at `now`, with why.
    fn overdue(&self, now: Instant) -> Vec<(u64, String)> {
        let limit = self.settings.heartbeat_timeout;
        let since = |t: Instant| now.saturating_duration_since(t);
        let mut out: Vec<(u64, String)> = self
            .sessions
            .iter()
            .filter(|(_, m)| since(m.last_seen) > limit)
            .map(|(id, m)| {
                (
                    *id,
                    format!(
                        "no heartbeat for {:.1} s (cluster.heartbeat_timeout_s = {})",
                        since(m.last_seen).as_secs_f64(),
                        limit.as_secs_f64()
                    ),
                )
            })
            .collect();
        let patience = self.settings.step_timeout;
        if let (Phase::Halting, Some((_, t))) = (&self.phase, &self.halt) {
            if since(*t) > patience {
                out.extend(
                    self.ranks
                        .iter()
                        .filter(|id| self.sessions.get(id).is_some_and(|m| !m.halted))
                        .map(|id| (*id, format!("did not halt within {patience:?}"))),
                );
            }
        }
        if let (Phase::Handover, Some((donor, t))) = (&self.phase, self.donor) {
            if since(t) > patience {
                out.push((donor, format!("did not send its state within {patience:?}")));
            }
        }
        out
    }

    fn rank_of(&self, session: u64, generation: u64) -> Result<usize, Status> {
        if !self.sessions.contains_key(&session) {
            return Err(Status::not_found(format!("unknown session {session}")));
        }
        if generation != self.generation {
            tracing::warn!(
                session,
                generation,
                current = self.generation,
                "refused a message of a stale generation"
            );
            return Err(Status::failed_precondition(format!(
                "message of stale generation {generation}: the run is in generation {}",
                self.generation
            )));
        }
        if !matches!(
            self.phase,
            Phase::Running | Phase::Halting | Phase::Handover
        ) {
            return Err(Status::failed_precondition("the run is not training"));
        }
        self.ranks
            .iter()
            .position(|s| *s == session)
            .ok_or_else(|| Status::failed_precondition("this session has no rank in the ring"))
    }

    /// A step report; commits every step all ranks have reported, in order.
    pub fn report(&mut self, report: pb::StepReport) -> Result<Effects, Status> {
        let rank = self.rank_of(report.session, report.generation)?;
        let step = report.step;
        let end = self
            .settings
            .stop_step
            .min(self.committed.saturating_add(MAX_AHEAD));
        if step < self.committed || step >= end {
            return Err(Status::invalid_argument(format!(
                "step {step} is outside the uncommitted steps [{}, {end})",
                self.committed
            )));
        }
        let fits = |terms: &[pb::Term]| {
            terms.len() <= MAX_TERMS
                && terms
                    .iter()
                    .all(|t| !t.name.is_empty() && t.name.len() <= MAX_NAME)
        };
        if !fits(&report.terms) || !fits(&report.test) {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_TERMS} loss terms and {MAX_TERMS} test figures, with names of 1–{MAX_NAME} bytes"
            )));
        }
        let world = self.ranks.len();
        let slot = self
            .reports
            .entry(step)
            .or_insert_with(|| vec![None; world]);
        if slot[rank].is_some() {
            return Err(Status::invalid_argument(format!(
                "rank {rank} already reported step {step}"
            )));
        }
        slot[rank] = Some(report);
        let mut fx = Vec::new();
        loop {
            let next = self.committed;
            let ready = self
                .reports
                .get(&next)
                .is_some_and(|r| r.iter().all(Option::is_some));
            if !ready {
                break;
            }
            let reports: Vec<pb::StepReport> = self
                .reports
                .remove(&next)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            match self.commit(&reports, world as u32) {
                Ok(c) => fx.push(Effect::Commit(c)),
                Err(reason) => {
                    self.fail_into(reason, &mut fx);
                    return Ok(fx);
                }
            }
            self.committed = next + 1;
        }
        self.finish_if_done(&mut fx);
        Ok(fx)
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
            generation: first.generation,
            timings: StepTimings {
                data: slowest(|r| r.data_s),
                compute: slowest(|r| r.compute_s),
                reduce: slowest(|r| r.reduce_s),
                update: slowest(|r| r.update_s),
            },
            test: first
                .test
                .iter()
                .map(|t| (t.name.clone(), t.value))
                .collect(),
        })
    }

    /// Checks a checkpoint upload and says what it is.
    pub fn check_upload(&self, upload: &pb::CheckpointUpload) -> Result<Upload, Status> {
        let rank = self.rank_of(upload.session, upload.generation)?;
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
            let asked = self.phase == Phase::Handover
                && self.donor.is_some_and(|(d, _)| d == upload.session);
            if !asked {
                return Err(Status::failed_precondition(
                    "this worker was not asked for its state",
                ));
            }
            if upload.step != self.committed {
                return Err(Status::invalid_argument(format!(
                    "state of step {}, but step {} was asked for",
                    upload.step, self.committed
                )));
            }
            return Ok(Upload::Handover {
                step: upload.step,
                persist: self.draining || self.committed >= self.settings.stop_step,
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
    pub fn saved(&mut self, step: u64) -> Effects {
        let mut fx = Vec::new();
        self.checkpoint = self.checkpoint.max(Some(step));
        self.finish_if_done(&mut fx);
        fx
    }

    /// The donor's state arrived (and is durable, if it was to be written): the run stops
    /// there, or the next generation forms with it.
    pub fn handed_over(&mut self, step: u64, files: crate::Files, now: Instant) -> Effects {
        let mut fx = Vec::new();
        if self.phase != Phase::Handover || step != self.committed {
            return fx;
        }
        self.donor = None;
        self.state = Some((step, files));
        if self.draining || step >= self.settings.stop_step {
            if self.checkpoint == Some(step) {
                self.finish("stopped with a checkpoint", &mut fx);
            } else {
                // The stop came after this state was sent unwritten: ask for it again, to keep.
                self.ask_donor(true, now, &mut fx);
            }
            return fx;
        }
        self.phase = Phase::Rendezvous;
        self.try_form(now, &mut fx);
        fx
    }

    /// Finishes the run once every step is committed and the last one checkpointed.
    fn finish_if_done(&mut self, fx: &mut Effects) {
        let stop_step = self.settings.stop_step;
        if self.phase == Phase::Running
            && self.committed >= stop_step
            && self.checkpoint == Some(stop_step)
        {
            self.finish("the run finished", fx);
        }
    }

    /// Ends the run here. Stopped by a signal before the run's end, it is resumable: the
    /// workers wait for a restarted coordinator rather than leave.
    fn finish(&mut self, reason: &str, fx: &mut Effects) {
        self.phase = Phase::Finished;
        let resumable = self.draining && self.committed < self.settings.stop_step;
        fx.extend(
            self.sessions
                .keys()
                .map(|id| Effect::Send(*id, stop(reason, false, resumable))),
        );
    }

    /// A summary of where the run stands.
    pub fn summary(&self) -> Summary {
        Summary {
            steps: self.committed,
            world: self.ranks.len() as u32,
            generation: self.generation,
            checkpoint: self.checkpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The decisions, table by table: hand-built runs, synthetic time, effects compared.

    use std::time::Duration;

    use super::*;
    use crate::Files;
    use tonic::Code;

    const SECOND: Duration = Duration::from_secs(1);

    fn settings(workers: u32, min_workers: u32, stop_step: u64) -> Settings {
        Settings {
            run_id: "run".into(),
            token: "tok".into(),
            config_toml: String::new(),
            config_sha256: "abc".into(),
            workers,
            min_workers,
            rendezvous_timeout: 10 * SECOND,
            heartbeat_timeout: 5 * SECOND,
            step_timeout: 20 * SECOND,
            checksum_every: 0,
            checkpoint_every: 0,
            start_step: 0,
            stop_step,
            checkpoint: None,
            max_message_bytes: 1 << 20,
            tls: None,
        }
    }

    fn join_msg(id: &str) -> pb::Join {
        pb::Join {
            run_id: "run".into(),
            config_sha256: String::new(),
            worker_id: id.into(),
            peer_address: "127.0.0.1:9".into(),
            device: "cpu".into(),
            last_generation: 0,
        }
    }

    thread_local! {
        /// Worker ids by session, of every worker a test joined (left ones too).
        static NAMES: std::cell::RefCell<BTreeMap<u64, String>> = Default::default();
    }

    /// Joins worker `id` at `now`, remembering its name for [`said`].
    fn join(run: &mut Run, id: &str, now: Instant) -> Result<(u64, Vec<Effect>), Status> {
        let (session, fx) = run.join(&join_msg(id), now)?;
        NAMES.with(|n| n.borrow_mut().insert(session, id.to_string()));
        Ok((session, fx))
    }

    /// What a list of effects does, in words: `start w1 r0/2 g1`, `halt w0`, `stop w1`, ….
    fn said(fx: &[Effect]) -> Vec<String> {
        let who = |id: &u64| NAMES.with(|n| n.borrow().get(id).cloned()).unwrap();
        fx.iter()
            .map(|e| match e {
                Effect::Send(id, c) => match c.kind.as_ref().unwrap() {
                    pb::command::Kind::Welcome(_) => format!("welcome {}", who(id)),
                    pb::command::Kind::Start(s) => format!(
                        "start {} r{}/{} g{} @{}{}",
                        who(id),
                        s.rank,
                        s.world,
                        s.generation,
                        s.start_step,
                        if s.checkpoint.is_empty() {
                            ""
                        } else {
                            " +state"
                        }
                    ),
                    pb::command::Kind::Halt(h) => format!("halt {} g{}", who(id), h.generation),
                    pb::command::Kind::SendState(s) => {
                        format!("send-state {} persist={}", who(id), s.persist)
                    }
                    pb::command::Kind::Stop(s) => {
                        let resumable = if s.resumable { " resumable" } else { "" };
                        format!("stop {} failed={}{resumable}", who(id), s.failed)
                    }
                },
                Effect::Commit(c) => format!("commit {}", c.step),
                Effect::Close(id) => format!("close {}", who(id)),
            })
            .collect()
    }

    /// A run with workers `ids` joined at `t0`, and their session ids.
    fn joined(s: Settings, ids: &[&str], t0: Instant) -> (Run, Vec<u64>) {
        let mut run = Run::new(s, Secret::from_bytes([9; 32]), t0);
        let sessions = ids
            .iter()
            .map(|id| join(&mut run, id, t0).unwrap().0)
            .collect();
        (run, sessions)
    }

    fn report(session: u64, generation: u64, step: u64, checksum: Option<u64>) -> pb::StepReport {
        pb::StepReport {
            session,
            generation,
            step,
            terms: vec![pb::Term {
                name: "loss".into(),
                value: 1.0,
            }],
            applied: true,
            rows: 4,
            global_rows: 8,
            checksum,
            epoch: 0,
            step_in_epoch: step + 1,
            ..Default::default()
        }
    }

    fn halted(session: u64, generation: u64, step: u64) -> pb::Halted {
        pb::Halted {
            session,
            generation,
            step,
        }
    }

    #[test]
    fn joins_are_refused_with_the_status_their_fault_calls_for() {
        let t0 = Instant::now();
        type Mutate = fn(&mut pb::Join);
        let table: [(&str, Mutate, Code); 6] = [
            (
                "other run",
                |j| j.run_id = "x".into(),
                Code::FailedPrecondition,
            ),
            (
                "other config",
                |j| j.config_sha256 = "def".into(),
                Code::FailedPrecondition,
            ),
            (
                "bad id",
                |j| j.worker_id = "a b".into(),
                Code::InvalidArgument,
            ),
            (
                "bad peer",
                |j| j.peer_address = "nowhere".into(),
                Code::InvalidArgument,
            ),
            (
                "bad device",
                |j| j.device = String::new(),
                Code::InvalidArgument,
            ),
            (
                "same id",
                |j| j.worker_id = "w0".into(),
                Code::AlreadyExists,
            ),
        ];
        for (what, mutate, code) in table {
            let (mut run, _) = joined(settings(2, 2, 10), &["w0"], t0);
            let mut j = join_msg("w1");
            mutate(&mut j);
            assert_eq!(run.join(&j, t0).unwrap_err().code(), code, "{what}");
            assert_eq!(run.sessions.len(), 1, "{what}: nobody more joined");
        }
        let (mut run, _) = joined(settings(2, 2, 10), &["w0", "w1"], t0);
        assert_eq!(
            run.join(&join_msg("w2"), t0).unwrap_err().code(),
            Code::ResourceExhausted,
            "a full run"
        );
        run.fail("gone".into());
        run.sessions.clear();
        assert_eq!(
            run.join(&join_msg("w2"), t0).unwrap_err().code(),
            Code::FailedPrecondition,
            "an ended run"
        );
    }

    #[test]
    fn the_rendezvous_forms_the_ring_when_enough_workers_are_there() {
        let t0 = Instant::now();
        // (workers, min_workers, joined, seconds after the start, what happens)
        type Row<'a> = (u32, u32, &'a [&'a str], u64, &'a [&'a str]);
        let table: [Row; 5] = [
            (
                2,
                2,
                &["b", "a"],
                0,
                &["start a r0/2 g1 @0", "start b r1/2 g1 @0"],
            ),
            (3, 2, &["a", "b"], 9, &[]),
            (
                3,
                2,
                &["a", "b"],
                10,
                &["start a r0/2 g1 @0", "start b r1/2 g1 @0"],
            ),
            (3, 3, &["a", "b"], 9, &[]),
            (
                3,
                3,
                &["a", "b"],
                10,
                &["stop a failed=true", "stop b failed=true"],
            ),
        ];
        for (workers, min, ids, secs, want) in table {
            let mut s = settings(workers, min, 10);
            s.heartbeat_timeout = 60 * SECOND;
            let (mut run, _) = joined(s, ids, t0);
            let fx = run.tick(t0 + Duration::from_secs(secs));
            assert_eq!(said(&fx), want, "{workers}/{min} with {ids:?} at {secs} s");
        }
        let (mut run, s) = joined(settings(3, 3, 10), &["a", "b"], t0);
        for session in s {
            run.seen(session, t0 + 9 * SECOND);
        }
        run.tick(t0 + 10 * SECOND);
        match &run.phase {
            Phase::Failed(why) => assert!(why.contains("cluster.min_workers"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn steps_commit_in_order_once_every_rank_reported() {
        let t0 = Instant::now();
        let (mut run, s) = joined(settings(2, 2, 3), &["a", "b"], t0);
        run.tick(t0);
        let mut commits = Vec::new();
        for (session, step) in [(s[0], 0), (s[0], 1), (s[1], 0), (s[1], 1)] {
            let fx = run.report(report(session, 1, step, None)).unwrap();
            commits.extend(said(&fx));
        }
        assert_eq!(commits, ["commit 0", "commit 1"]);
        let err = run.report(report(s[0], 1, 0, None)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "a committed step");
        let err = run.report(report(s[0], 0, 2, None)).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "a stale generation");
        let err = run.report(report(s[0], 1, 3, None)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "past the stop step");
        // The last step commits, the last checkpoint is saved: the run finishes.
        run.report(report(s[0], 1, 2, None)).unwrap();
        run.report(report(s[1], 1, 2, None)).unwrap();
        let fx = run.saved(3);
        assert_eq!(said(&fx), ["stop a failed=false", "stop b failed=false"]);
        assert_eq!(run.phase, Phase::Finished);
    }

    #[test]
    fn replicas_that_differ_fail_the_run() {
        let t0 = Instant::now();
        let mut s0 = settings(2, 2, 10);
        s0.checksum_every = 2;
        let (mut run, s) = joined(s0, &["a", "b"], t0);
        run.tick(t0);
        for session in [s[0], s[1]] {
            run.report(report(session, 1, 0, None)).unwrap();
        }
        run.report(report(s[0], 1, 1, Some(7))).unwrap();
        let fx = run.report(report(s[1], 1, 1, Some(8))).unwrap();
        assert_eq!(said(&fx), ["stop a failed=true", "stop b failed=true"]);
        match &run.phase {
            Phase::Failed(why) => assert!(why.contains("replicas diverged at step 1"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A running two-worker run at generation 1 with steps 0..3 committed.
    fn running_at_3(t0: Instant) -> (Run, Vec<u64>) {
        let (mut run, s) = joined(settings(2, 1, 10), &["a", "b"], t0);
        run.tick(t0);
        for step in 0..3 {
            for session in [s[0], s[1]] {
                run.report(report(session, 1, step, None)).unwrap();
            }
        }
        (run, s)
    }

    #[test]
    fn a_lost_worker_halts_the_generation_and_the_ring_re_forms_without_it() {
        let t0 = Instant::now();
        // (how b is lost, when)
        let table: [(&str, u64); 2] = [("its session closed", 1), ("silent", 6)];
        for (how, secs) in table {
            let (mut run, s) = running_at_3(t0);
            run.seen(s[0], t0 + 5 * SECOND);
            let fx = if how == "silent" {
                run.tick(t0 + Duration::from_secs(secs))
            } else {
                run.left(s[1], how, t0 + Duration::from_secs(secs))
            };
            assert_eq!(said(&fx), ["close b", "halt a g1"], "{how}");
            assert_eq!(run.phase, Phase::Halting);
            // a halts at step 4 (it trained step 3 before the halt reached it; b never
            // reported it): step 3 commits from a's report alone, and the ring re-forms.
            run.report(report(s[0], 1, 3, None)).unwrap();
            let fx = run.halted(&halted(s[0], 1, 4), t0 + 7 * SECOND).unwrap();
            assert_eq!(said(&fx), ["commit 3", "start a r0/1 g2 @4"], "{how}");
        }
    }

    /// The ring keys of the `Start`s among `fx`, by session.
    fn ring_keys(fx: &[Effect]) -> Vec<(u64, Vec<u8>)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send(
                    id,
                    pb::Command {
                        kind: Some(pb::command::Kind::Start(s)),
                    },
                ) => Some((*id, s.ring_key.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_session_gets_its_credential_and_each_generation_its_ring_key() {
        let t0 = Instant::now();
        let secret = Secret::from_bytes([9; 32]);
        let mut run = Run::new(settings(2, 1, 10), secret.clone(), t0);
        let mut sessions = Vec::new();
        for id in ["a", "b"] {
            let (session, fx) = join(&mut run, id, t0).unwrap();
            let Effect::Send(
                _,
                pb::Command {
                    kind: Some(pb::command::Kind::Welcome(w)),
                },
            ) = &fx[0]
            else {
                panic!("a welcome first: {fx:?}");
            };
            assert_eq!(w.credential, secret.session_credential(session).as_bytes());
            sessions.push(session);
        }
        let first = ring_keys(&run.tick(t0));
        let key1 = secret.ring_key(1).as_bytes().to_vec();
        assert_eq!(first, [(sessions[0], key1.clone()), (sessions[1], key1)]);
        run.left(sessions[1], "killed", t0);
        let fx = run.halted(&halted(sessions[0], 1, 0), t0).unwrap();
        let second = ring_keys(&fx);
        assert_eq!(
            second,
            [(sessions[0], secret.ring_key(2).as_bytes().to_vec())]
        );
        assert_ne!(first[0].1, second[0].1, "a new generation, a new key");
    }

    #[test]
    fn a_worker_that_does_not_halt_in_time_is_dropped() {
        let t0 = Instant::now();
        let (mut run, s) = running_at_3(t0);
        run.drain("SIGTERM", t0);
        run.halted(&halted(s[0], 1, 3), t0).unwrap();
        run.seen(s[0], t0 + 20 * SECOND);
        run.seen(s[1], t0 + 20 * SECOND);
        assert_eq!(
            said(&run.clone().tick(t0 + 20 * SECOND)),
            Vec::<String>::new()
        );
        let fx = run.tick(t0 + 21 * SECOND);
        assert_eq!(
            said(&fx)[..2],
            ["close b".to_string(), "send-state a persist=true".into()]
        );
    }

    #[test]
    fn a_newcomer_halts_the_generation_and_gets_the_state_from_a_peer() {
        let t0 = Instant::now();
        let (mut run, s) = running_at_3(t0);
        run.left(s[1], "killed", t0);
        run.halted(&halted(s[0], 1, 3), t0).unwrap();
        assert_eq!(run.phase, Phase::Running, "a alone at generation 2");
        for step in 3..5 {
            run.report(report(s[0], 2, step, None)).unwrap();
        }
        let (c, fx) = join(&mut run, "c", t0).unwrap();
        assert_eq!(said(&fx), ["welcome c", "halt a g2"]);
        let fx = run.halted(&halted(s[0], 2, 5), t0).unwrap();
        assert_eq!(said(&fx), ["send-state a persist=false"]);
        assert_eq!(run.phase, Phase::Handover);
        let upload = pb::CheckpointUpload {
            session: s[0],
            generation: 2,
            step: 5,
            files: vec![pb::File {
                name: "state.json".into(),
                data: vec![1],
            }],
            requested: true,
        };
        assert!(matches!(
            run.check_upload(&upload),
            Ok(Upload::Handover {
                step: 5,
                persist: false
            })
        ));
        let stranger = pb::CheckpointUpload {
            session: c,
            ..upload.clone()
        };
        assert_eq!(
            run.check_upload(&stranger).unwrap_err().code(),
            Code::FailedPrecondition,
            "only the donor answers"
        );
        let files = Files::from([("state.json".to_string(), vec![1])]);
        let fx = run.handed_over(5, files, t0);
        assert_eq!(
            said(&fx),
            ["start a r0/2 g3 @5", "start c r1/2 g3 @5 +state"],
            "the state goes to the newcomer only"
        );
    }

    #[test]
    fn a_drain_stops_at_a_step_boundary_with_a_checkpoint() {
        let t0 = Instant::now();
        let (mut run, s) = running_at_3(t0);
        let fx = run.drain("SIGTERM", t0);
        assert_eq!(said(&fx), ["halt a g1", "halt b g1"]);
        assert_eq!(
            run.join(&join_msg("c"), t0).unwrap_err().code(),
            Code::FailedPrecondition,
            "no newcomers while draining"
        );
        run.halted(&halted(s[0], 1, 3), t0).unwrap();
        let fx = run.halted(&halted(s[1], 1, 3), t0).unwrap();
        assert_eq!(said(&fx), ["send-state a persist=true"]);
        let fx = run.saved(3);
        assert!(fx.is_empty(), "not finished before the hand-over completes");
        let fx = run.handed_over(3, Files::new(), t0);
        assert_eq!(
            said(&fx),
            [
                "stop a failed=false resumable",
                "stop b failed=false resumable"
            ],
            "stopped before the run's end: the workers wait for a restarted coordinator"
        );
        assert_eq!(run.phase, Phase::Finished);
    }

    #[test]
    fn stale_messages_are_refused_or_ignored() {
        let t0 = Instant::now();
        let (mut run, s) = running_at_3(t0);
        run.left(s[1], "killed", t0);
        run.halted(&halted(s[0], 1, 3), t0).unwrap();
        // Generation 2 runs now; generation 1's messages are from the past.
        assert!(run.halted(&halted(s[0], 1, 3), t0).unwrap().is_empty());
        assert_eq!(
            run.report(report(s[0], 1, 3, None)).unwrap_err().code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            run.report(report(99, 2, 3, None)).unwrap_err().code(),
            Code::NotFound,
            "an unknown session"
        );
        let upload = pb::CheckpointUpload {
            session: s[0],
            generation: 1,
            step: 3,
            files: vec![pb::File {
                name: "a".into(),
                data: vec![],
            }],
            requested: false,
        };
        assert_eq!(
            run.check_upload(&upload).unwrap_err().code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn losing_every_worker_fails_the_run() {
        let t0 = Instant::now();
        let (mut run, s) = running_at_3(t0);
        run.left(s[0], "killed", t0);
        let fx = run.left(s[1], "killed", t0);
        assert_eq!(said(&fx), ["close b"]);
        match &run.phase {
            Phase::Failed(why) => assert!(why.contains("every worker of generation 1"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
