//! The coordinator's decisions on arbitrary sequences of events (joins, heartbeats, losses,
//! halts, step reports, checkpoint uploads, drains, failures, time): the rules
//! `elbo_coordinator::fuzzing::replay` checks after every event hold.
#![no_main]

use elbo_coordinator::fuzzing::{replay, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|events: Vec<Event>| {
    replay(&events);
});
