//! Decoding chunks ahead of use on a small pool of threads.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::chunk_reader::{read_chunk, ChunkData};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};

type Job = (u32, Sender<Result<ChunkData>>);

/// A pool of decoder threads and the chunks submitted to it, by chunk index.
pub(crate) struct Prefetcher {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    in_flight: BTreeMap<u32, Receiver<Result<ChunkData>>>,
}

impl Prefetcher {
    /// Starts `threads` decoder threads over `dataset` (0: decode on the caller's thread).
    pub(crate) fn new(dataset: &Arc<Dataset>, threads: usize) -> Self {
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let threads = (0..threads)
            .map(|i| {
                let (queue, dataset) = (queue.clone(), dataset.clone());
                std::thread::Builder::new()
                    .name(format!("elbo-decode-{i}"))
                    .spawn(move || loop {
                        let job = queue.lock().map(|q| q.recv());
                        let Ok(Ok((chunk, reply))) = job else { return };
                        let decoded = read_chunk(&dataset, &dataset.chunks()[chunk as usize]);
                        let _ = reply.send(decoded);
                    })
                    .expect("spawning a decoder thread")
            })
            .collect::<Vec<_>>();
        Prefetcher {
            jobs: (!threads.is_empty()).then_some(jobs),
            threads,
            in_flight: BTreeMap::new(),
        }
    }

    /// Chunks submitted and not yet taken.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues a chunk for decoding (no-op without threads or if already queued).
    pub(crate) fn submit(&mut self, chunk: u32) {
        let Some(jobs) = &self.jobs else { return };
        if self.in_flight.contains_key(&chunk) {
            return;
        }
        let (reply, result) = channel();
        if jobs.send((chunk, reply)).is_ok() {
            self.in_flight.insert(chunk, result);
        }
    }

    /// The decoded chunk: from the pool if it was submitted, otherwise decoded right here.
    pub(crate) fn take(&mut self, dataset: &Dataset, chunk: u32) -> Result<ChunkData> {
        match self.in_flight.remove(&chunk) {
            Some(result) => result.recv().map_err(|_| {
                DataError::Invalid(format!("decoder thread for chunk {chunk} stopped"))
            })?,
            None => read_chunk(dataset, &dataset.chunks()[chunk as usize]),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.jobs.take();
        self.in_flight.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
