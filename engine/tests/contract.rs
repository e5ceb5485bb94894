//! The model contract through the engine, with a model registered here and nowhere else: it
//! trains end to end (config section, checkpoints, evaluation, pictures); its non-gradient
//! state — a running mean of the data, updated from all-reduced sums — is equal at world 1, 2
//! and 4, survives a resume, is handed to a worker that joins mid-run, and a replica whose
//! state drifts is caught by the replica checksum. Distributed runs are a coordinator and its
//! workers on threads of this process, on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{Device, Tensor, D};
use elbo_engine::launch::CoordinatorOptions;
use elbo_engine::worker::WorkerOptions;
use elbo_engine::{Engine, EngineError, StopSignal, TrainOptions};
use elbo_models::{
    linear, Buffers, BuildContext, EvalOptions, Evaluator, Input, Linear, LossOutput, Metric,
    Metrics, Model, ModelSpec, Params, Registry, Section, SectionError, Statistics, StepContext,
    Term, Variant,
};
use elbo_settings::{Config, Layers};
use serde::{Deserialize, Serialize};

/// `[model.running_mean]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunningMeanConfig {
    /// Weight of the newest batch in the running mean.
    momentum: f64,
    /// Hidden units of the autoencoder.
    hidden: usize,
}

impl Default for RunningMeanConfig {
    fn default() -> Self {
        RunningMeanConfig {
            momentum: 0.1,
            hidden: 16,
        }
    }
}

impl Section for RunningMeanConfig {
    fn validate(&self) -> Result<(), SectionError> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(SectionError::new(
                "momentum",
                format!("found {}, expected a number in [0, 1]", self.momentum),
            ));
        }
        Ok(())
    }
}

/// An autoencoder of the data centred on its running mean: the mean is non-gradient state.
struct RunningMean {
    params: Params,
    buffers: Buffers,
    enc: Linear,
    dec: Linear,
    mean: Tensor,
    momentum: f64,
    dim: usize,
    /// Adds a drift to the mean after this step (a replica gone wrong).
    drift_after: Option<u64>,
}

const MEAN: &str = "state.data_mean";

impl RunningMean {
    fn new(spec: &ModelSpec, cfg: &RunningMeanConfig, ctx: &BuildContext) -> RunningMean {
        let dim: usize = spec.input_shape.iter().product();
        let mut params = Params::new(&ctx.device, ctx.seed);
        let enc = linear(&mut params, "enc", dim, cfg.hidden).unwrap();
        let dec = linear(&mut params, "dec", cfg.hidden, dim).unwrap();
        let mut buffers = Buffers::new(&ctx.device);
        let mean = buffers.declare(MEAN, &[dim], vec![0.0; dim]).unwrap();
        RunningMean {
            params,
            buffers,
            enc,
            dec,
            mean,
            momentum: cfg.momentum,
            dim,
            drift_after: None,
        }
    }

    /// Per-row squared error of the centred reconstruction, and the reconstruction.
    fn errors(&self, x: &Tensor) -> elbo_models::Result<(Tensor, Tensor)> {
        let centred = x.broadcast_sub(&self.mean)?;
        let out = self.dec.forward(&self.enc.forward_relu(&centred)?)?;
        let errors = (&out - &centred)?.sqr()?.sum(D::Minus1)?;
        Ok((errors, out.broadcast_add(&self.mean)?))
    }
}

impl Model for RunningMean {
    fn params(&self) -> &Params {
        &self.params
    }

    fn buffers(&self) -> Option<&Buffers> {
        Some(&self.buffers)
    }

    fn statistics(&self) -> Statistics {
        Statistics {
            terms: vec!["loss", "rows_seen"],
            batch: Vec::new(),
            update: self.dim + 1,
        }
    }

    fn loss(&self, input: &Input<'_>, ctx: &StepContext<'_>) -> elbo_models::Result<LossOutput> {
        let (errors, _) = self.errors(input.x)?;
        let rows = input.ids.len();
        let device = input.x.device();
        let loss = (errors.sum_all()? / ctx.global_rows as f64)?;
        let count = Tensor::new(&[rows as f32], device)?;
        Ok(LossOutput {
            loss,
            terms: BTreeMap::from([
                ("loss", Term::per_row(&errors)?),
                ("rows_seen", Term::constant(1.0, rows, device)?),
            ]),
            update_stats: Some(Tensor::cat(&[&input.x.sum(0)?, &count], 0)?),
        })
    }

    fn update_state(&mut self, stats: &[f32], step: u64) -> elbo_models::Result<()> {
        let (sums, n) = stats.split_at(self.dim);
        let m = self.momentum as f32;
        let mut mean = self.buffers.values(MEAN)?;
        for (v, s) in mean.iter_mut().zip(sums) {
            *v = (1.0 - m) * *v + m * s / n[0];
        }
        if self.drift_after == Some(step) {
            mean[0] += 1e-3;
        }
        self.buffers.set(MEAN, &mean)
    }

    fn evaluator<'a>(&'a self, _: EvalOptions<'a>) -> elbo_models::Result<Box<dyn Evaluator + 'a>> {
        Ok(Box::new(MeanError {
            model: self,
            rows: 0,
            sum: 0.0,
        }))
    }

    fn sample(
        &self,
        n: usize,
        _: u64,
        _: Option<&[i64]>,
        _: &Device,
    ) -> elbo_models::Result<Tensor> {
        Ok(self.mean.unsqueeze(0)?.repeat((n, 1))?)
    }

    fn reconstruct(&self, input: &Input<'_>) -> elbo_models::Result<Tensor> {
        Ok(self.errors(input.x)?.1)
    }
}

struct MeanError<'a> {
    model: &'a RunningMean,
    rows: u64,
    sum: f64,
}

impl Evaluator for MeanError<'_> {
    fn add(&mut self, input: &Input<'_>) -> elbo_models::Result<()> {
        let (errors, _) = self.model.errors(input.x)?;
        self.sum += f64::from(errors.sum_all()?.to_scalar::<f32>()?);
        self.rows += input.ids.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Metrics {
        Metrics::from([(
            "mse".to_string(),
            Metric::Value(self.sum / self.rows.max(1) as f64),
        )])
    }
}

impl Variant for RunningMean {
    const KIND: &'static str = "running_mean";
    const ABOUT: &'static str = "a test model with a running mean of the data as its state";
    type Config = RunningMeanConfig;

    fn build(
        spec: &ModelSpec,
        cfg: &RunningMeanConfig,
        ctx: &BuildContext,
    ) -> elbo_models::Result<Box<dyn Model>> {
        Ok(Box::new(RunningMean::new(spec, cfg, ctx)))
    }
}

/// The same kind, as a replica that goes wrong after step 4 builds it.
struct Drifting;

impl Variant for Drifting {
    const KIND: &'static str = "running_mean";
    const ABOUT: &'static str = "a replica whose running mean drifts";
    type Config = RunningMeanConfig;

    fn build(
        spec: &ModelSpec,
        cfg: &RunningMeanConfig,
        ctx: &BuildContext,
    ) -> elbo_models::Result<Box<dyn Model>> {
        let mut model = RunningMean::new(spec, cfg, ctx);
        model.drift_after = Some(4);
        Ok(Box::new(model))
    }
}

fn engine<V: Variant>(cache: &Path) -> Engine {
    let mut registry = Registry::builtin();
    registry.register::<V>();
    Engine::new(registry, cache.to_path_buf())
}

/// 600 sprites of 32×32, batch 48 (13 steps per epoch, the last one short), 2 epochs.
fn config(engine: &Engine, run: &Path, workers: u32, extra: &[&str]) -> Config {
    let mut flags = vec![
        "model.kind=running_mean".to_string(),
        "model.running_mean.momentum=0.25".into(),
        "data.sprites.n=600".into(),
        "train.batch_size=48".into(),
        "train.epochs=2".into(),
        "train.log_every=1".into(),
        "train.checkpoint_every=10".into(),
        "cluster.checksum_every=1".into(),
        format!("cluster.workers={workers}"),
        format!("run.dir={}", run.display()),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    engine
        .load_config(&Layers {
            flags,
            ..Default::default()
        })
        .unwrap()
}

fn train_here(engine: &Engine, cfg: Config, max_steps: Option<u64>) -> elbo_engine::TrainSummary {
    let options = TrainOptions {
        device: "cpu".into(),
        force: false,
        max_steps,
        exe: PathBuf::from("elbo-is-not-started-here"),
        metrics_addr: None,
    };
    elbo_engine::train(engine, cfg, &options, &StopSignal::default()).unwrap()
}

/// A coordinator and one worker thread per engine; returns the coordinator's outcome and each
/// worker's. `join_late` workers join once `late_after` steps are committed.
fn train_threads(
    cfg: Config,
    engines: Vec<Engine>,
    join_late: usize,
    late_after: u64,
) -> (
    elbo_engine::Result<elbo_engine::TrainSummary>,
    Vec<elbo_engine::Result<()>>,
) {
    let run_dir = PathBuf::from(&cfg.run.dir);
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    let coordinator_engine = engines[0].clone();
    let run_id = cfg.run.name.clone();
    let coordinator = std::thread::spawn(move || {
        let options = CoordinatorOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: "t".into(),
            force: false,
            max_steps: None,
            metrics_addr: None,
        };
        elbo_engine::launch::serve(
            &coordinator_engine,
            cfg,
            &options,
            &StopSignal::default(),
            |addr| addr_tx.send(addr).unwrap(),
        )
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let on_time = engines.len() - join_late;
    let workers: Vec<_> = engines
        .into_iter()
        .enumerate()
        .map(|(i, engine)| {
            let options = WorkerOptions {
                coordinator: format!("http://{addr}"),
                run_id: run_id.clone(),
                token: "t".into(),
                worker_id: format!("worker-{i}"),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                device: "cpu".into(),
                config: None,
                connect_timeout: Duration::from_secs(30),
                audit_rows: None,
                throttle: Duration::from_millis(if i < on_time { 50 } else { 0 }),
                metrics_addr: None,
                tls: Default::default(),
            };
            let metrics = run_dir.join("metrics.jsonl");
            std::thread::spawn(move || {
                if i >= on_time {
                    wait_for_steps(&metrics, late_after);
                }
                elbo_engine::worker::run(&engine, &options)
            })
        })
        .collect();
    let outcome = coordinator.join().unwrap();
    let workers = workers.into_iter().map(|w| w.join().unwrap()).collect();
    (outcome, workers)
}

fn wait_for_steps(metrics: &Path, steps: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let logged = |t: String| t.lines().filter(|l| l.contains("\"loss\"")).count() as u64;
    while std::fs::read_to_string(metrics).map_or(0, logged) < steps {
        assert!(
            std::time::Instant::now() < deadline,
            "no step {steps} in time"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The tensors of a checkpoint, by name.
fn tensors(checkpoint: &Path) -> BTreeMap<String, Vec<f32>> {
    elbo_worker::checkpoint::model_tensors(checkpoint).unwrap()
}

fn assert_close(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, x) in a {
        let y = &b[name];
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (p, q) in x.iter().zip(y) {
            diff += f64::from(p - q).powi(2);
            norm += f64::from(*p).powi(2);
        }
        let rel = (diff / norm.max(1e-30)).sqrt();
        assert!(rel < 1e-5, "{what}: {name} differs by {rel:e} (relative)");
    }
}

const LAST: &str = "checkpoints/step-000000026";

#[test]
fn a_model_registered_outside_the_builtins_trains_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine::<RunningMean>(&tmp.path().join("cache"));
    let run = tmp.path().join("run");
    let summary = train_here(&engine, config(&engine, &run, 1, &[]), None);
    assert_eq!(summary.steps, 26);
    let test = summary.test.expect("a finished run is evaluated");
    assert!(
        matches!(test["mse"], Metric::Value(v) if v.is_finite()),
        "{test:?}"
    );
    assert!(matches!(test["rows"], Metric::Count(60)), "{test:?}");
    let saved = tensors(&run.join(LAST));
    assert!(saved.contains_key(MEAN), "the state is in the checkpoint");
    let mean = &saved[MEAN];
    assert!(
        mean.iter().any(|v| *v > 0.0) && mean.iter().all(|v| (0.0..=1.0).contains(v)),
        "the running mean follows the data in [0, 1]"
    );
    for picture in ["samples.png", "reconstructions.png", "loss.png"] {
        assert!(run.join("samples").join(picture).is_file(), "{picture}");
    }
    let written = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        written.contains("[model.running_mean]") && written.contains("momentum = 0.25"),
        "{written}"
    );
    let loaded = elbo_engine::load_run(&engine, &run, &Device::Cpu).unwrap();
    assert!(
        loaded.model.buffers().unwrap().values(MEAN).unwrap() == *mean,
        "loading a run restores its state"
    );

    let bad = engine.load_config(&Layers {
        flags: vec![
            "model.kind=running_mean".into(),
            "model.running_mean.momentum=2".into(),
        ],
        ..Default::default()
    });
    let msg = bad.unwrap_err().to_string();
    assert!(
        msg.contains("model.running_mean.momentum") && msg.contains("expected a number in [0, 1]"),
        "{msg}"
    );
}

#[test]
fn the_state_is_equal_at_one_two_and_four_workers_and_after_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let engine = engine::<RunningMean>(&cache);
    let one = tmp.path().join("world1");
    train_here(&engine, config(&engine, &one, 1, &[]), None);
    let reference = tensors(&one.join(LAST));
    for world in [2u32, 4] {
        let dir = tmp.path().join(format!("world{world}"));
        let engines = (0..world).map(|_| engine.clone()).collect();
        let (outcome, workers) = train_threads(config(&engine, &dir, world, &[]), engines, 0, 0);
        assert_eq!(outcome.unwrap().step, 26, "world {world}");
        assert!(workers.iter().all(Result::is_ok), "world {world}");
        assert_close(
            &reference,
            &tensors(&dir.join(LAST)),
            &format!("world {world}"),
        );
    }
    let resumed = tmp.path().join("resumed");
    let first = train_here(&engine, config(&engine, &resumed, 1, &[]), Some(11));
    assert_eq!(first.step, 11);
    train_here(&engine, config(&engine, &resumed, 1, &[]), None);
    let file = |run: &Path| std::fs::read(run.join(LAST).join("model.safetensors")).unwrap();
    assert!(
        file(&one) == file(&resumed),
        "a resume at the same world size is bit-exact, state included"
    );
}

#[test]
fn a_worker_that_joins_mid_run_gets_the_state() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine::<RunningMean>(&tmp.path().join("cache"));
    let one = tmp.path().join("world1");
    train_here(&engine, config(&engine, &one, 1, &[]), None);
    let dir = tmp.path().join("joined");
    let cfg = config(
        &engine,
        &dir,
        3,
        &["cluster.min_workers=2", "cluster.rendezvous_timeout_s=0.5"],
    );
    let engines = (0..3).map(|_| engine.clone()).collect();
    let (outcome, workers) = train_threads(cfg, engines, 1, 6);
    let summary = outcome.unwrap();
    assert_eq!(
        (summary.step, summary.world),
        (26, 3),
        "the joiner trained to the end"
    );
    assert!(workers.iter().all(Result::is_ok));
    assert_close(
        &tensors(&one.join(LAST)),
        &tensors(&dir.join(LAST)),
        "joined",
    );
}

#[test]
fn a_replica_whose_state_drifts_is_caught_by_the_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let honest = engine::<RunningMean>(&cache);
    let dir = tmp.path().join("run");
    let cfg = config(&honest, &dir, 2, &[]);
    let (outcome, workers) =
        train_threads(cfg, vec![honest.clone(), engine::<Drifting>(&cache)], 0, 0);
    match outcome {
        Err(EngineError::Coordinator(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("replicas diverged at step 4"), "{msg}");
        }
        other => panic!("the run went on: {:?}", other.map(|s| s.step)),
    }
    assert!(
        workers.iter().all(Result::is_err),
        "every worker was stopped"
    );
}
