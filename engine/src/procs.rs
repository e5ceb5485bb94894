//! Child processes that never outlive their parent's interest in them.

use std::process::Child;

/// Named child processes; dropping this kills (and reaps) any still running.
#[derive(Default)]
pub struct Children(pub Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Threads per process when `processes` share this machine's cores.
pub fn threads_each(processes: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes.max(1) as usize).max(1)
}
