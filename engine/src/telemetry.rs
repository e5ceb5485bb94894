//! Prometheus metrics of a run, served over HTTP at `/metrics` when `--metrics-addr` is given
//! (`elbo train`, `elbo coordinator`, `elbo worker`): committed step, throughput, each loss
//! term and test figure, world size and generation, ring re-formations, skipped steps, the
//! step's time by part and checkpoint durations, all named `elbo_*`, in the OpenMetrics text
//! format (`prometheus-client`). A coordinator (or a run in one process) reports the run's
//! global figures — the slowest rank's time per part — and a worker its own.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elbo_worker::StepReport;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::error::{io, EngineError, Result};

/// A loss term's or test figure's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Term {
    term: String,
}

/// A part of a step's time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Part {
    part: String,
}

type Real = Gauge<f64, AtomicU64>;

/// Steps whose rows make up the throughput figure.
const THROUGHPUT_WINDOW: usize = 32;

/// One committed (or, on a worker, trained) step as the metrics see it.
pub struct StepFigures<'a> {
    /// Global steps taken.
    pub step: u64,
    /// Rows trained in the step (the global batch; a worker's share on a worker).
    pub rows: u64,
    /// False when the step was skipped as non-finite.
    pub applied: bool,
    /// Loss terms of the global batch.
    pub terms: &'a BTreeMap<String, f64>,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Ranks that took part.
    pub world: u32,
    /// Ring generation (0 in one process).
    pub generation: u64,
    /// Waiting for data, forward and backward, all-reduce, optimizer update.
    pub parts: [Duration; 4],
}

impl<'a> StepFigures<'a> {
    /// A step this process trained: the trainer's `report` of it, after `step` global steps,
    /// `rows` rows here, `data` spent waiting for them, in ring `(world, generation)`.
    pub fn trained(
        report: &'a StepReport,
        step: u64,
        rows: u64,
        data: Duration,
        (world, generation): (u32, u64),
    ) -> Self {
        let t = report.timings;
        StepFigures {
            step,
            rows,
            applied: report.applied,
            terms: &report.terms,
            grad_norm: report.grad_norm,
            lr: report.lr,
            world,
            generation,
            parts: [data, t.compute, t.reduce, t.update],
        }
    }
}

/// The run's metrics (see the module's documentation).
pub struct Telemetry {
    registry: Registry,
    step: Gauge,
    total_steps: Gauge,
    samples: Counter,
    samples_per_s: Real,
    loss: Family<Term, Real>,
    test: Family<Term, Real>,
    grad_norm: Real,
    lr: Real,
    world: Gauge,
    generation: Gauge,
    reforms: Counter,
    skipped: Counter,
    /// `elbo_step_seconds` of each of [`PARTS`].
    parts: [Histogram; 4],
    checkpoint_seconds: Histogram,
    /// (when, rows) of the last steps, for `elbo_samples_per_second`.
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

const PARTS: [&str; 4] = ["data", "compute", "reduce", "update"];

impl Telemetry {
    /// Metrics of a run, every figure at 0.
    pub fn new() -> Arc<Self> {
        // The parts' histograms, made once (a step only observes them), under one name.
        let step_seconds = Family::<Part, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-4, 2.0, 20))
        });
        let parts = PARTS.map(|part| {
            let label = Part {
                part: part.to_string(),
            };
            step_seconds.get_or_create(&label).clone()
        });
        let mut t = Telemetry {
            registry: Registry::with_prefix("elbo"),
            step: Gauge::default(),
            total_steps: Gauge::default(),
            samples: Counter::default(),
            samples_per_s: Real::default(),
            loss: Family::default(),
            test: Family::default(),
            grad_norm: Real::default(),
            lr: Real::default(),
            world: Gauge::default(),
            generation: Gauge::default(),
            reforms: Counter::default(),
            skipped: Counter::default(),
            parts,
            checkpoint_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 16)),
            recent: Mutex::new(VecDeque::with_capacity(THROUGHPUT_WINDOW + 1)),
        };
        let r = &mut t.registry;
        r.register("step", "Global steps taken", t.step.clone());
        r.register(
            "total_steps",
            "Steps of the whole run",
            t.total_steps.clone(),
        );
        r.register("samples", "Rows trained", t.samples.clone());
        r.register(
            "samples_per_second",
            "Rows trained per second over the last steps",
            t.samples_per_s.clone(),
        );
        r.register(
            "loss",
            "Loss terms of the last step's batch",
            t.loss.clone(),
        );
        r.register(
            "test",
            "The test set's figures at the last evaluation",
            t.test.clone(),
        );
        r.register(
            "grad_norm",
            "Gradient norm before clipping",
            t.grad_norm.clone(),
        );
        r.register(
            "learning_rate",
            "Learning rate of the last step",
            t.lr.clone(),
        );
        r.register("world_size", "Ranks in the ring", t.world.clone());
        r.register(
            "generation",
            "Ring generation (0 in one process)",
            t.generation.clone(),
        );
        r.register(
            "ring_reforms",
            "Ring re-formations seen (a worker lost, joined or replaced)",
            t.reforms.clone(),
        );
        r.register(
            "skipped_steps",
            "Steps skipped as non-finite",
            t.skipped.clone(),
        );
        r.register_with_unit(
            "step",
            "A step's time by part (the slowest rank's, on a coordinator)",
            Unit::Seconds,
            step_seconds,
        );
        r.register_with_unit(
            "checkpoint",
            "Time to write (or send) a checkpoint",
            Unit::Seconds,
            t.checkpoint_seconds.clone(),
        );
        Arc::new(t)
    }

    /// The run's length and where it stands (known once the config is).
    pub fn run(&self, total_steps: u64, step: u64) {
        self.total_steps.set(total_steps as i64);
        self.step.set(step as i64);
    }

    /// Records a step.
    pub fn step(&self, s: &StepFigures<'_>) {
        self.step.set(s.step as i64);
        self.samples.inc_by(s.rows);
        if !s.applied {
            self.skipped.inc();
        }
        for (term, v) in s.terms {
            self.loss
                .get_or_create(&Term { term: term.clone() })
                .set(*v);
        }
        self.grad_norm.set(s.grad_norm);
        self.lr.set(s.lr);
        self.world.set(i64::from(s.world));
        if self.generation.get() != s.generation as i64 {
            if self.generation.get() != 0 {
                self.reforms.inc();
            }
            self.generation.set(s.generation as i64);
        }
        for (histogram, d) in self.parts.iter().zip(s.parts) {
            histogram.observe(d.as_secs_f64());
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((Instant::now(), s.rows));
        if recent.len() > THROUGHPUT_WINDOW {
            recent.pop_front();
        }
        if let (Some(first), Some(last)) = (recent.front(), recent.back()) {
            let secs = last.0.duration_since(first.0).as_secs_f64();
            let rows: u64 = recent.iter().skip(1).map(|r| r.1).sum();
            if secs > 0.0 {
                self.samples_per_s.set(rows as f64 / secs);
            }
        }
    }

    /// Records the test set's figures.
    pub fn test(&self, figures: &BTreeMap<String, f64>) {
        for (term, v) in figures {
            self.test
                .get_or_create(&Term { term: term.clone() })
                .set(*v);
        }
    }

    /// Records a checkpoint's duration.
    pub fn checkpoint(&self, took: Duration) {
        self.checkpoint_seconds.observe(took.as_secs_f64());
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A metrics endpoint being served; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `telemetry` at `http://addr/metrics` on a thread of its own until the returned server
/// is dropped.
pub fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<MetricsServer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("cannot start the metrics server"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(io(format!("--metrics-addr {addr}: cannot listen")))?;
    let bound = listener
        .local_addr()
        .map_err(io("cannot read the metrics address"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    telemetry.render(),
                )
            }
        }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let serving = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = runtime.block_on(async { serving.await }) {
                tracing::warn!("the metrics server stopped: {e}");
            }
        })
        .map_err(|e| EngineError::Failed(format!("cannot start the metrics server: {e}")))?;
    tracing::info!(addr = %bound, "serving metrics at /metrics");
    Ok(MetricsServer {
        addr: bound,
        stop: Some(stop),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scrape(addr: SocketAddr) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("application/openmetrics-text"),
            "{response}"
        );
        response.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {label:?}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn the_endpoint_serves_what_the_run_recorded() {
        let t = Telemetry::new();
        let server = serve("127.0.0.1:0".parse().unwrap(), t.clone()).unwrap();
        t.run(100, 0);
        let terms: BTreeMap<String, f64> =
            [("loss".to_string(), 91.5), ("kl".to_string(), 12.25)].into();
        let ms = Duration::from_millis;
        for (step, generation, applied) in [(1, 1, true), (2, 1, false), (3, 2, true)] {
            t.step(&StepFigures {
                step,
                rows: 128,
                applied,
                terms: &terms,
                grad_norm: 3.5,
                lr: 1e-3,
                world: 4,
                generation,
                parts: [ms(1), ms(20), ms(3), ms(2)],
            });
        }
        t.test(&[("neg_elbo".to_string(), 95.0)].into());
        t.checkpoint(ms(40));
        let text = scrape(server.local_addr());
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        for (name, label, want) in [
            ("elbo_step", None, 3.0),
            ("elbo_total_steps", None, 100.0),
            ("elbo_samples_total", None, 384.0),
            ("elbo_loss", Some(("term", "loss")), 91.5),
            ("elbo_loss", Some(("term", "kl")), 12.25),
            ("elbo_test", Some(("term", "neg_elbo")), 95.0),
            ("elbo_grad_norm", None, 3.5),
            ("elbo_learning_rate", None, 1e-3),
            ("elbo_world_size", None, 4.0),
            ("elbo_generation", None, 2.0),
            ("elbo_ring_reforms_total", None, 1.0),
            ("elbo_skipped_steps_total", None, 1.0),
        ] {
            assert_eq!(value(&parsed, name, label), want, "{name} {label:?}");
        }
        let histogram = |name: &str, label: Option<(&str, &str)>| {
            let s = parsed
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .unwrap_or_else(|| panic!("no {name}"));
            match &s.value {
                prometheus_parse::Value::Histogram(buckets) => buckets.last().unwrap().count,
                other => panic!("{name}: {other:?}"),
            }
        };
        assert_eq!(
            histogram("elbo_step_seconds", Some(("part", "compute"))),
            3.0
        );
        assert_eq!(histogram("elbo_checkpoint_seconds", None), 1.0);
        assert!(value(&parsed, "elbo_samples_per_second", None) > 0.0);
        drop(server);
    }
}
