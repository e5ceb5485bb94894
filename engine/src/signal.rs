//! A request to stop a run early, raised from a signal handler (SIGTERM, Ctrl-C) or another
//! thread. The first asks for a stop at the next step boundary with a checkpoint there; a
//! second one for a stop at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use elbo_coordinator::Aborter;

/// Shared between whoever raises it and the run that heeds it.
#[derive(Clone, Default)]
pub struct StopSignal {
    raised: Arc<AtomicU32>,
    coordinator: Arc<Mutex<Option<Aborter>>>,
}

impl StopSignal {
    /// Raises it: the first time a drain, the second time an abort.
    pub fn raise(&self) {
        let times = self.raised.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(aborter) = self.lock().as_ref() {
            if times == 1 {
                aborter.drain("interrupted (Ctrl-C or SIGTERM)");
            } else {
                aborter.abort("interrupted twice (Ctrl-C or SIGTERM)");
            }
        }
    }

    /// Whether it was raised.
    pub fn raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst) > 0
    }

    /// Routes it to a coordinator (which stops its workers); one raised before is passed on.
    pub(crate) fn attach(&self, aborter: Aborter) {
        let mut slot = self.lock();
        if self.raised() {
            aborter.drain("interrupted (Ctrl-C or SIGTERM)");
        }
        *slot = Some(aborter);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Aborter>> {
        self.coordinator.lock().unwrap_or_else(|p| p.into_inner())
    }
}
