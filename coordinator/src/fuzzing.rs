//! The coordinator's decisions driven by arbitrary sequences of events — joins, heartbeats,
//! losses, halts, step reports, checkpoint uploads, drains, failures and the passage of time —
//! as the service would feed them (`fuzz/fuzz_targets/coordinator_events.rs` generates them,
//! the tests below replay fixed ones). After every event [`replay`] checks what must hold
//! whatever the workers send: no panic, steps committed once each and in order, generations
//! that only grow, never more members than `cluster.workers`, a running generation whose ranks
//! are all members, commands only to sessions that exist or just left, and an end that stays
//! an end. [`check_authentication`] does the same for the gate's decision on any headers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use elbo_proto::auth::{self, Key, Secret};
use elbo_proto::v1 as pb;

use crate::auth::{authenticate, Caller};
use crate::state::{Effect, Phase, Run, Upload};
use crate::Settings;

/// Workers a replayed run waits for.
const WORKERS: u32 = 3;
/// Steps a replayed run trains.
const STOP_STEP: u64 = 6;

/// One thing that happens to the coordinator. Sessions, generations and steps are small
/// numbers interpreted relative to the run's state, so that most events are about the run
/// as it stands (and some are not).
#[derive(Debug, Clone, Arbitrary)]
pub enum Event {
    /// A worker asks to join (`worker` picks its id; `bad` spoils one field of its `Join`).
    Join {
        worker: u8,
        bad: u8,
        last_generation: u8,
    },
    /// A heartbeat.
    Seen { session: u8 },
    /// A session's stream ends.
    Left { session: u8 },
    /// A worker says it cannot go on.
    Failed { session: u8 },
    /// A worker has halted at a step boundary.
    Halted {
        session: u8,
        generation: u8,
        step: u8,
    },
    /// A step report.
    Report(Report),
    /// A checkpoint upload, and the store's answer to it.
    Upload {
        session: u8,
        generation: u8,
        step: u8,
        requested: bool,
        files: u8,
    },
    /// SIGTERM: stop at the next step boundary with a checkpoint.
    Drain,
    /// The coordinator's own failure (a store that cannot write).
    Fail,
    /// Time passes (`ms` milliseconds, up to a minute) and the coordinator ticks.
    Wait { ms: u16 },
}

/// The fields of a step report a replica could get wrong.
#[derive(Debug, Clone, Arbitrary)]
pub struct Report {
    session: u8,
    generation: u8,
    step: u8,
    loss: f64,
    checksum: Option<u8>,
    applied: bool,
    rows: u8,
    epoch: u8,
    terms: u8,
}

/// What a replay reached, to show that events did drive the run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reached {
    /// Steps committed.
    pub committed: u64,
    /// Generations formed.
    pub generations: u64,
    /// Whether the run finished (not failed).
    pub finished: bool,
}

fn settings() -> Settings {
    Settings {
        run_id: "run".into(),
        token: String::new(),
        config_toml: String::new(),
        config_sha256: "abc".into(),
        workers: WORKERS,
        min_workers: 2,
        rendezvous_timeout: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(5),
        step_timeout: Duration::from_secs(20),
        checksum_every: 2,
        checkpoint_every: 0,
        start_step: 0,
        stop_step: STOP_STEP,
        checkpoint: None,
        max_message_bytes: 1 << 20,
        tls: None,
    }
}

/// A session id near the ones the run has handed out (0 and one past the last are strangers).
fn session(run: &Run, n: u8) -> u64 {
    u64::from(n) % (run.next_session + 1)
}

/// The current generation, the one before, or (rarely) one far off.
fn generation(run: &Run, n: u8) -> u64 {
    match n {
        0..=199 => run.summary().generation,
        200..=239 => run.summary().generation.saturating_sub(1),
        _ => u64::from(n),
    }
}

/// A step near the next one to commit.
fn step(run: &Run, n: u8) -> u64 {
    let next = run.summary().steps;
    match n {
        0..=249 => next + u64::from(n % 3),
        _ => next.saturating_sub(u64::from(n - 249)),
    }
}

fn join_message(worker: u8, bad: u8, last_generation: u8) -> pb::Join {
    let mut join = pb::Join {
        run_id: "run".into(),
        config_sha256: String::new(),
        worker_id: format!("w{}", worker % 6),
        peer_address: format!("127.0.0.1:{}", 9000 + u16::from(worker % 6)),
        device: "cpu".into(),
        last_generation: u64::from(last_generation),
    };
    match bad {
        0 => join.run_id = "other".into(),
        1 => join.config_sha256 = "def".into(),
        2 => join.worker_id = "w 0/..".into(),
        3 => join.peer_address = "nowhere".into(),
        4 => join.device = String::new(),
        _ => {}
    }
    join
}

fn report_message(run: &Run, r: &Report) -> pb::StepReport {
    let term = |i: u8| pb::Term {
        name: if i == 7 {
            String::new()
        } else {
            format!("t{i}")
        },
        value: r.loss,
    };
    pb::StepReport {
        session: session(run, r.session),
        generation: generation(run, r.generation),
        step: step(run, r.step),
        terms: (0..r.terms % 9).map(term).collect(),
        applied: r.applied,
        rows: u64::from(r.rows),
        global_rows: 4 * u64::from(r.rows),
        checksum: r.checksum.map(|c| u64::from(c % 2)),
        epoch: u64::from(r.epoch % 2),
        ..Default::default()
    }
}

/// Applies `events` to a fresh run, checking after each that the run is still sound, and
/// says how far it got.
///
/// # Panics
/// When a decision breaks one of the rules in the module's documentation (what the fuzz target
/// looks for).
pub fn replay(events: &[Event]) -> Reached {
    let start = Instant::now();
    let mut now = start;
    let mut run = Run::new(settings(), Secret::from_bytes([7; 32]), now);
    let mut reached = Reached::default();
    for event in events {
        let before = run.summary();
        let ended = run.ended();
        let known: BTreeSet<u64> = run.sessions.keys().copied().collect();
        let fx = apply(&mut run, event, &mut now);
        let after = run.summary();
        assert!(after.steps >= before.steps, "{event:?} uncommitted steps");
        assert!(after.steps <= STOP_STEP, "{event:?} committed past the end");
        assert!(
            after.generation >= before.generation,
            "{event:?} went back a generation"
        );
        assert!(!ended || run.ended(), "{event:?} revived an ended run");
        assert!(
            run.sessions.len() <= WORKERS as usize,
            "{event:?} admitted more than cluster.workers"
        );
        if run.phase == Phase::Running {
            let ranks = &run.ranks;
            let distinct: BTreeSet<u64> = ranks.iter().copied().collect();
            assert!(!ranks.is_empty(), "running with no ranks");
            assert_eq!(distinct.len(), ranks.len(), "a session holds two ranks");
            assert!(
                ranks.iter().all(|id| run.sessions.contains_key(id)),
                "{event:?} left a lost worker in the running ring"
            );
        }
        let mut next_commit = before.steps;
        for effect in &fx {
            match effect {
                Effect::Commit(c) => {
                    assert_eq!(c.step, next_commit, "{event:?} committed out of order");
                    next_commit += 1;
                }
                Effect::Send(id, _) | Effect::Close(id) => assert!(
                    known.contains(id) || run.sessions.contains_key(id),
                    "{event:?} spoke to session {id}, which never joined"
                ),
            }
        }
        assert_eq!(
            next_commit, after.steps,
            "{event:?} committed steps without saying so"
        );
        reached.committed = after.steps;
        reached.generations = after.generation;
        reached.finished = run.phase == Phase::Finished;
    }
    reached
}

/// Feeds one event to `run` the way the service does, returning the effects.
fn apply(run: &mut Run, event: &Event, now: &mut Instant) -> Vec<Effect> {
    match *event {
        Event::Join {
            worker,
            bad,
            last_generation,
        } => run
            .join(&join_message(worker, bad, last_generation), *now)
            .map(|(_, fx)| fx)
            .unwrap_or_default(),
        Event::Seen { session: s } => {
            run.seen(session(run, s), *now);
            Vec::new()
        }
        Event::Left { session: s } => run.left(session(run, s), "its stream ended", *now),
        Event::Failed { session: s } => run
            .worker_failed(session(run, s), "out of memory")
            .unwrap_or_default(),
        Event::Halted {
            session: s,
            generation: g,
            step: k,
        } => {
            let halted = pb::Halted {
                session: session(run, s),
                generation: generation(run, g),
                step: step(run, k),
            };
            run.halted(&halted, *now).unwrap_or_default()
        }
        Event::Report(ref r) => run.report(report_message(run, r)).unwrap_or_default(),
        Event::Upload {
            session: s,
            generation: g,
            step: k,
            requested,
            files,
        } => {
            let upload = pb::CheckpointUpload {
                session: session(run, s),
                generation: generation(run, g),
                step: step(run, k),
                files: (0..files % 4)
                    .map(|i| pb::File {
                        name: if i == 2 {
                            "../x".into()
                        } else {
                            format!("f{i}")
                        },
                        data: vec![i],
                    })
                    .collect(),
                requested,
            };
            match run.check_upload(&upload) {
                Ok(Upload::Periodic(step)) => run.saved(step),
                Ok(Upload::Handover { step, persist }) => {
                    let mut fx = Vec::new();
                    if persist {
                        fx.extend(run.saved(step));
                    }
                    let files = upload
                        .files
                        .iter()
                        .map(|f| (f.name.clone(), f.data.clone()))
                        .collect();
                    fx.extend(run.handed_over(step, files, *now));
                    fx
                }
                Err(_) => Vec::new(),
            }
        }
        Event::Drain => run.drain("SIGTERM", *now),
        Event::Fail => run.fail("the store failed".into()),
        Event::Wait { ms } => {
            *now += Duration::from_millis(u64::from(ms));
            run.tick(*now)
        }
    }
}

/// The run token and secret [`check_authentication`] checks calls against.
const TOKEN: &str = "s3cret-token";
const SECRET: [u8; 32] = [7; 32];

/// Decides whether a call to `/elbo.v1.Coordinator/{method}` with `headers` may go on, and
/// checks the decision: a `Session` call only with the run token, any other only with a
/// session's credential, and then as that session and no other.
///
/// # Panics
/// When a call without the right credential is let through (what the fuzz target looks for).
pub fn check_authentication(method: &str, headers: &http::HeaderMap) {
    let secret = Secret::from_bytes(SECRET);
    let path = format!(
        "/{}/{method}",
        elbo_proto::v1::coordinator_server::SERVICE_NAME
    );
    let Ok(caller) = authenticate(&path, headers, TOKEN, &secret) else {
        return;
    };
    let bearer = auth::bearer_of(headers).expect("let through without a bearer credential");
    match caller {
        Caller::Worker => {
            assert_eq!(method, "Session", "the token opened {method}");
            assert_eq!(bearer, TOKEN, "a session opened without the token");
        }
        Caller::Session(session) => {
            assert_ne!(method, "Session", "a credential opened a session");
            assert_eq!(
                auth::number_of(headers, auth::SESSION),
                Some(session),
                "authenticated as another session than the header names"
            );
            let key = Key::from_hex(bearer).expect("a credential that is not a key");
            assert!(
                key.as_bytes() == secret.session_credential(session).as_bytes(),
                "a wrong credential was let through for session {session}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(session: u8, step: u8) -> Event {
        Event::Report(Report {
            session,
            generation: 0,
            step,
            loss: 1.5,
            checksum: Some(0),
            applied: true,
            rows: 8,
            epoch: 0,
            terms: 2,
        })
    }

    /// Three workers join and train, one is lost, the other two go on, and the run finishes with its
    /// checkpoint: the replay does reach every part of a run, so the fuzz target's events can.
    #[test]
    fn a_whole_run_replays_to_its_end() {
        let mut events: Vec<Event> = (0..3)
            .map(|w| Event::Join {
                worker: w,
                bad: 9,
                last_generation: 0,
            })
            .collect();
        events.push(Event::Wait { ms: 1 });
        for _ in 0..2 {
            events.extend((1..=3).map(|s| report(s, 0)));
        }
        events.push(Event::Left { session: 2 });
        events.extend([1, 3].map(|s| Event::Halted {
            session: s,
            generation: 0,
            step: 0,
        }));
        for _ in 0..4 {
            events.extend([1, 3].map(|s| report(s, 0)));
        }
        events.push(Event::Upload {
            session: 1,
            generation: 0,
            step: 0,
            requested: false,
            files: 1,
        });
        let reached = replay(&events);
        assert_eq!(
            reached,
            Reached {
                committed: STOP_STEP,
                generations: 2,
                finished: true,
            }
        );
    }

    #[test]
    fn only_the_right_credentials_pass_the_gate() {
        let secret = Secret::from_bytes(SECRET);
        let headers = |pairs: &[(&'static str, String)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        let good = headers(&[
            (
                "authorization",
                auth::bearer(&secret.session_credential(3).to_hex()),
            ),
            (auth::SESSION, "3".into()),
        ]);
        check_authentication("Report", &good);
        check_authentication("Session", &good);
        check_authentication(
            "Session",
            &headers(&[("authorization", auth::bearer(TOKEN))]),
        );
        check_authentication(
            "Report",
            &headers(&[("authorization", auth::bearer(TOKEN))]),
        );
    }

    /// Hostile and mistaken events in every state: the rules hold (no panic) and the run stays
    /// sound, across many pseudo-random sequences.
    #[test]
    fn random_event_sequences_keep_the_rules() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..300 {
            let bytes: Vec<u8> = (0..600)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let events: Vec<Event> = arbitrary::Unstructured::new(&bytes)
                .arbitrary()
                .expect("events from bytes");
            replay(&events);
        }
    }
}
