//! A worker's decisions between and during generations, as pure functions of where it stands
//! and what arrived; `worker.rs` carries them out. Tested in tables below.

use elbo_worker::session::{Command, StartCommand};
use elbo_worker::WorkerError;

use crate::error::EngineError;

/// Where a worker stands between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Standing {
    /// Global steps its trainer has taken.
    pub step: u64,
    /// The newest generation it has been in.
    pub generation: u64,
    /// The generation it last reported halting in.
    pub halted: Option<u64>,
}

/// What a worker that is not training does with a command.
#[derive(Debug, Clone)]
pub(crate) enum Idle<'a> {
    /// Take on the generation's starting state ([`adopt`]) and train.
    Start(&'a StartCommand),
    /// Say it has halted in this generation, at its step.
    ReportHalt(u64),
    /// Nothing to do: a halt of another generation, or one already reported.
    Ignore,
    /// Send its state to the coordinator (for a lagging or joining peer, or to keep).
    SendState(u64),
    /// The run ended: stop.
    Stop {
        /// Why.
        reason: String,
        /// Whether the run failed.
        failed: bool,
    },
}

/// A worker between generations, told `command`.
pub(crate) fn on_idle(at: Standing, command: &Command) -> Idle<'_> {
    match command {
        Command::Start(start) => Idle::Start(start),
        Command::Halt { generation } if halt_once(at, *generation) => Idle::ReportHalt(*generation),
        Command::Halt { .. } => Idle::Ignore,
        Command::SendState { generation } => Idle::SendState(*generation),
        Command::Stop { reason, failed } => Idle::Stop {
            reason: reason.clone(),
            failed: *failed,
        },
    }
}

/// A halt of `generation` is reported once, and only for the generation the worker is in.
pub(crate) fn halt_once(at: Standing, generation: u64) -> bool {
    generation == at.generation && at.halted != Some(generation)
}

/// How a worker takes on the state a generation starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adopt {
    /// The coordinator sent a state: restore it.
    Restore,
    /// It already stands at the start step: keep its own state.
    Keep,
    /// The run starts from step 0 and this worker is elsewhere (a coordinator restarted from
    /// nothing): start afresh.
    Fresh,
}

/// How a worker at `step` adopts the start of a generation, or why it cannot.
pub(crate) fn adopt(step: u64, start: &StartCommand) -> Result<Adopt, String> {
    if start.checkpoint.is_some() {
        Ok(Adopt::Restore)
    } else if step == start.start_step {
        Ok(Adopt::Keep)
    } else if start.start_step == 0 {
        Ok(Adopt::Fresh)
    } else {
        Err(format!(
            "generation {} starts at step {} but this worker is at step {step} and was sent no state",
            start.generation, start.start_step
        ))
    }
}

/// What a training worker does with a command that arrives between two steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Training {
    /// Stop at this step boundary: the generation is halted.
    Halt,
    /// The run ended: stop.
    Stop {
        /// Why.
        reason: String,
        /// Whether the run failed.
        failed: bool,
    },
    /// A command that makes no sense while training: the worker fails.
    Refuse(String),
}

/// A training worker, told `command`.
pub(crate) fn on_training(command: &Command) -> Training {
    match command {
        Command::Halt { .. } => Training::Halt,
        Command::Stop { reason, failed } => Training::Stop {
            reason: reason.clone(),
            failed: *failed,
        },
        other => Training::Refuse(format!(
            "the coordinator sent {other:?} while this worker trains"
        )),
    }
}

/// What a failure means for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The ring broke (a peer was lost, the generation was aborted): halt at the step
    /// boundary it stands at and go on in the next generation.
    Halt,
    /// The coordinator is unreachable or broke the session off: join again with backoff.
    Reconnect,
    /// This worker cannot go on (bad data, non-finite loss, a bug): the run fails.
    Fail,
}

/// The fate of a failed generation.
pub(crate) fn fate(error: &EngineError) -> Fate {
    match error {
        EngineError::Worker(WorkerError::Ring(_)) => Fate::Halt,
        EngineError::Worker(WorkerError::Coordinator(_)) => Fate::Reconnect,
        _ => Fate::Fail,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn start(generation: u64, start_step: u64, state: bool) -> StartCommand {
        StartCommand {
            generation,
            rank: 0,
            world: 1,
            peers: vec!["127.0.0.1:9".parse().unwrap()],
            stop_step: 100,
            checksum_every: 0,
            checkpoint_every: 0,
            checkpoint: state.then(Default::default),
            start_step,
            ring_key: elbo_proto::auth::Secret::from_bytes([1; 32]).ring_key(generation),
            abort: Arc::default(),
        }
    }

    #[test]
    fn an_idle_worker_answers_each_command() {
        let at = Standing {
            step: 7,
            generation: 3,
            halted: None,
        };
        let halted = Standing {
            halted: Some(3),
            ..at
        };
        let stop = Command::Stop {
            reason: "done".into(),
            failed: false,
        };
        let table = [
            (at, Command::Start(start(4, 7, false)), "start g4"),
            (at, Command::Halt { generation: 3 }, "report halt g3"),
            (halted, Command::Halt { generation: 3 }, "ignore"),
            (at, Command::Halt { generation: 2 }, "ignore"),
            (at, Command::SendState { generation: 3 }, "send state g3"),
            (at, stop, "stop: done"),
        ];
        for (standing, command, want) in table {
            let got = match on_idle(standing, &command) {
                Idle::Start(s) => format!("start g{}", s.generation),
                Idle::ReportHalt(g) => format!("report halt g{g}"),
                Idle::Ignore => "ignore".into(),
                Idle::SendState(g) => format!("send state g{g}"),
                Idle::Stop { reason, failed } => {
                    format!("stop{}: {reason}", if failed { " (failed)" } else { "" })
                }
            };
            assert_eq!(got, want, "{standing:?} {command:?}");
        }
    }

    #[test]
    fn a_generation_is_adopted_from_state_sent_kept_or_started_afresh() {
        let table = [
            (7, start(2, 7, true), Ok(Adopt::Restore)),
            (3, start(2, 7, true), Ok(Adopt::Restore)),
            (7, start(2, 7, false), Ok(Adopt::Keep)),
            (0, start(1, 0, false), Ok(Adopt::Keep)),
            (7, start(2, 0, false), Ok(Adopt::Fresh)),
        ];
        for (step, s, want) in table {
            assert_eq!(adopt(step, &s), want, "at {step}, {s:?}");
        }
        let err = adopt(3, &start(2, 7, false)).unwrap_err();
        assert!(
            err.contains("starts at step 7 but this worker is at step 3"),
            "{err}"
        );
    }

    #[test]
    fn a_training_worker_halts_stops_or_refuses() {
        assert_eq!(
            on_training(&Command::Halt { generation: 1 }),
            Training::Halt
        );
        assert_eq!(
            on_training(&Command::Stop {
                reason: "x".into(),
                failed: true
            }),
            Training::Stop {
                reason: "x".into(),
                failed: true
            }
        );
        for command in [
            Command::Start(start(2, 0, false)),
            Command::SendState { generation: 1 },
        ] {
            assert!(
                matches!(on_training(&command), Training::Refuse(_)),
                "{command:?}"
            );
        }
    }

    #[test]
    fn failures_halt_reconnect_or_fail() {
        let table = [
            (
                EngineError::Worker(WorkerError::Ring("cut".into())),
                Fate::Halt,
            ),
            (
                EngineError::Worker(WorkerError::Coordinator("gone".into())),
                Fate::Reconnect,
            ),
            (
                EngineError::Worker(WorkerError::NonFinite {
                    count: 3,
                    step: 9,
                    what: "loss".into(),
                }),
                Fate::Fail,
            ),
            (EngineError::Invalid("bad".into()), Fate::Fail),
        ];
        for (error, want) in table {
            assert_eq!(fate(&error), want, "{error}");
        }
    }
}
