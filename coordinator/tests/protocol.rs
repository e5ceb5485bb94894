//! The coordinator against scripted workers speaking its gRPC protocol: joins refused with
//! clear statuses, steps committed in order, stale generations refused, replica divergence and
//! silent workers stopping the run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use elbo_coordinator::{
    CommittedStep, Coordinator, CoordinatorError, Files, RunStore, Settings, Summary,
};
use elbo_proto::auth::{self, Key};
use elbo_proto::v1 as pb;
use elbo_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

#[derive(Default)]
struct Memory {
    steps: Mutex<Vec<CommittedStep>>,
    checkpoints: Mutex<Vec<u64>>,
}

impl RunStore for Memory {
    fn committed(&self, step: &CommittedStep) -> Result<(), String> {
        self.steps.lock().unwrap().push(step.clone());
        Ok(())
    }

    fn save_checkpoint(&self, step: u64, _files: &Files) -> Result<(), String> {
        self.checkpoints.lock().unwrap().push(step);
        Ok(())
    }
}

fn settings(workers: u32, stop_step: u64) -> Settings {
    Settings {
        run_id: "run".into(),
        token: "tok".into(),
        config_toml: "[run]\n".into(),
        config_sha256: "abc".into(),
        workers,
        min_workers: workers,
        rendezvous_timeout: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(10),
        step_timeout: Duration::from_secs(10),
        checksum_every: 2,
        checkpoint_every: 0,
        start_step: 0,
        stop_step,
        checkpoint: None,
        max_message_bytes: 1 << 20,
        tls: None,
    }
}

type Outcome = std::thread::JoinHandle<Result<Summary, CoordinatorError>>;

fn start(settings: Settings) -> (String, Arc<Memory>, Outcome) {
    let store = Arc::new(Memory::default());
    let c = Coordinator::bind("127.0.0.1:0".parse().unwrap(), settings, store.clone()).unwrap();
    let url = format!("http://{}", c.local_addr());
    (url, store, std::thread::spawn(move || c.run()))
}

struct Fake {
    client: CoordinatorClient<Channel>,
    up: mpsc::UnboundedSender<pb::WorkerMessage>,
    down: Streaming<pb::Command>,
    session: u64,
    credential: Key,
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

/// Call headers: (name, value).
type Headers = Vec<(&'static str, String)>;

/// `message` with `headers`.
fn with_headers<T>(message: T, headers: &[(&'static str, String)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

async fn open(url: &str, join: pb::Join) -> Result<Fake, tonic::Status> {
    open_with_token(url, "tok", join).await
}

async fn open_with_token(url: &str, token: &str, join: pb::Join) -> Result<Fake, tonic::Status> {
    let mut client = CoordinatorClient::connect(url.to_string()).await.unwrap();
    let (up, rx) = mpsc::unbounded_channel();
    up.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Join(join)),
    })
    .unwrap();
    let stream = UnboundedReceiverStream::new(rx);
    let mut down = client
        .session(with_headers(
            stream,
            &[(auth::AUTHORIZATION, auth::bearer(token))],
        ))
        .await?
        .into_inner();
    let welcome = match down.next().await {
        Some(Ok(pb::Command {
            kind: Some(pb::command::Kind::Welcome(w)),
        })) => w,
        Some(Err(status)) => return Err(status),
        other => panic!("expected a welcome, got {other:?}"),
    };
    Ok(Fake {
        client,
        up,
        down,
        session: welcome.session,
        credential: Key::from_slice(&welcome.credential).expect("a 32-byte credential"),
    })
}

impl Fake {
    /// The headers that authenticate this session's calls.
    fn credentials(&self) -> Headers {
        vec![
            (auth::SESSION, self.session.to_string()),
            (auth::AUTHORIZATION, auth::bearer(&self.credential.to_hex())),
        ]
    }

    async fn command(&mut self) -> pb::command::Kind {
        let next = tokio::time::timeout(Duration::from_secs(10), self.down.next()).await;
        next.expect("a command in time")
            .unwrap()
            .unwrap()
            .kind
            .unwrap()
    }

    async fn report(
        &mut self,
        generation: u64,
        step: u64,
        checksum: Option<u64>,
    ) -> Result<(), tonic::Status> {
        self.report_loss(generation, step, checksum, 100.0 - step as f64)
            .await
    }

    async fn report_loss(
        &mut self,
        generation: u64,
        step: u64,
        checksum: Option<u64>,
        loss: f64,
    ) -> Result<(), tonic::Status> {
        let report = pb::StepReport {
            session: self.session,
            generation,
            step,
            terms: vec![pb::Term {
                name: "neg_elbo".into(),
                value: loss,
            }],
            rows: 8,
            global_rows: 16,
            applied: true,
            checksum,
            ..Default::default()
        };
        let request = with_headers(report, &self.credentials());
        self.client.report(request).await.map(|_| ())
    }

    async fn checkpoint(&mut self, step: u64) -> Result<(), tonic::Status> {
        self.upload(1, step, false).await
    }

    async fn upload(
        &mut self,
        generation: u64,
        step: u64,
        requested: bool,
    ) -> Result<(), tonic::Status> {
        let upload = pb::CheckpointUpload {
            session: self.session,
            generation,
            step,
            files: vec![pb::File {
                name: "state.json".into(),
                data: b"{}".to_vec(),
            }],
            requested,
        };
        let request = with_headers(upload, &self.credentials());
        self.client.save_checkpoint(request).await.map(|_| ())
    }

    async fn halted(&mut self, generation: u64, step: u64) -> Result<(), tonic::Status> {
        let halted = pb::Halted {
            session: self.session,
            generation,
            step,
        };
        let request = with_headers(halted, &self.credentials());
        self.client.halt(request).await.map(|_| ())
    }

    fn heartbeat(&self) {
        let _ = self.up.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {})),
        });
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn bad_joins_are_refused_and_steps_commit_in_order() {
    let (url, store, outcome) = start(settings(2, 4));
    rt().block_on(async {
        let wrong_token = open_with_token(&url, "nope", join_msg("a"))
            .await
            .err()
            .expect("refused");
        assert_eq!(wrong_token.code(), Code::Unauthenticated, "{wrong_token:?}");
        assert!(
            wrong_token.message().contains("wrong token"),
            "{wrong_token:?}"
        );
        let refused = [
            (
                pb::Join {
                    run_id: "other".into(),
                    ..join_msg("a")
                },
                Code::FailedPrecondition,
                "run id",
            ),
            (
                pb::Join {
                    config_sha256: "def".into(),
                    ..join_msg("a")
                },
                Code::FailedPrecondition,
                "config hash",
            ),
            (join_msg("bad id!"), Code::InvalidArgument, "worker id"),
            (
                pb::Join {
                    peer_address: "nowhere".into(),
                    ..join_msg("a")
                },
                Code::InvalidArgument,
                "peer address",
            ),
        ];
        for (join, code, text) in refused {
            let status = open(&url, join).await.err().expect("refused");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(text), "{status:?}");
        }
        let mut b = open(&url, join_msg("b")).await.unwrap();
        let twin = open(&url, join_msg("b")).await.err().unwrap();
        assert_eq!(twin.code(), Code::AlreadyExists);
        let mut a = open(&url, join_msg("a")).await.unwrap();
        // Ranks follow worker ids; both hold the generation's ring key.
        let mut ring_keys = Vec::new();
        for (fake, rank) in [(&mut a, 0), (&mut b, 1)] {
            match fake.command().await {
                pb::command::Kind::Start(s) => {
                    assert_eq!(
                        (s.rank, s.world, s.generation, s.stop_step),
                        (rank, 2, 1, 4)
                    );
                    assert_eq!(s.peers.len(), 2);
                    assert!(Key::from_slice(&s.ring_key).is_some(), "{:?}", s.ring_key);
                    ring_keys.push(s.ring_key);
                }
                other => panic!("expected Start, got {other:?}"),
            }
        }
        assert_eq!(ring_keys[0], ring_keys[1]);
        let late = open(&url, join_msg("c")).await.err().unwrap();
        assert_eq!(late.code(), Code::ResourceExhausted);
        // Calls without their session's credential are refused and change nothing.
        let forged = pb::StepReport {
            session: a.session,
            generation: 1,
            step: 0,
            terms: vec![pb::Term {
                name: "neg_elbo".into(),
                value: -1e9,
            }],
            rows: 8,
            global_rows: 16,
            applied: true,
            ..Default::default()
        };
        let made_up = Key::from_slice(&[1; 32]).unwrap();
        let attempts: [(&str, Headers, Code); 4] = [
            ("no credentials", vec![], Code::Unauthenticated),
            (
                "a made-up credential",
                vec![
                    (auth::SESSION, a.session.to_string()),
                    (auth::AUTHORIZATION, auth::bearer(&made_up.to_hex())),
                ],
                Code::Unauthenticated,
            ),
            (
                "b's credential under a's name",
                vec![
                    (auth::SESSION, a.session.to_string()),
                    (auth::AUTHORIZATION, auth::bearer(&b.credential.to_hex())),
                ],
                Code::Unauthenticated,
            ),
            ("b speaking for a", b.credentials(), Code::PermissionDenied),
        ];
        for (what, headers, code) in attempts {
            let status = a
                .client
                .clone()
                .report(with_headers(forged.clone(), &headers))
                .await
                .unwrap_err();
            assert_eq!(status.code(), code, "{what}: {status:?}");
        }
        // Reports out of order across ranks still commit in step order.
        a.report(1, 0, None).await.unwrap();
        a.report(1, 1, Some(7)).await.unwrap();
        assert!(
            store.steps.lock().unwrap().is_empty(),
            "nothing commits before every rank reports"
        );
        b.report(1, 1, Some(7)).await.unwrap();
        b.report(1, 0, None).await.unwrap();
        let stale = a.report(0, 2, None).await.unwrap_err();
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert!(stale.message().contains("stale generation"), "{stale:?}");
        let twice = a.report(1, 1, Some(7)).await.unwrap_err();
        assert_eq!(twice.code(), Code::InvalidArgument);
        let not_rank0 = b.checkpoint(2).await.unwrap_err();
        assert_eq!(not_rank0.code(), Code::PermissionDenied);
        for step in 2..4 {
            a.report(1, step, (step == 3).then_some(9)).await.unwrap();
            b.report(1, step, (step == 3).then_some(9)).await.unwrap();
        }
        a.checkpoint(4).await.unwrap();
        for fake in [&mut a, &mut b] {
            match fake.command().await {
                pb::command::Kind::Stop(s) => assert!(!s.failed, "{s:?}"),
                other => panic!("expected Stop, got {other:?}"),
            }
        }
    });
    let summary = outcome.join().unwrap().unwrap();
    assert_eq!(
        (summary.steps, summary.world, summary.checkpoint),
        (4, 2, Some(4))
    );
    let steps = store.steps.lock().unwrap();
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(steps.iter().all(|s| s.rows == 16 && s.world == 2));
    assert_eq!(steps[2].terms["neg_elbo"], 98.0);
}

#[test]
fn diverged_replicas_stop_the_run() {
    let (url, _store, outcome) = start(settings(2, 4));
    rt().block_on(async {
        let mut a = open(&url, join_msg("a")).await.unwrap();
        let mut b = open(&url, join_msg("b")).await.unwrap();
        a.command().await;
        b.command().await;
        a.report(1, 0, None).await.unwrap();
        b.report(1, 0, None).await.unwrap();
        a.report(1, 1, Some(1)).await.unwrap();
        b.report(1, 1, Some(2)).await.unwrap();
        match a.command().await {
            pb::command::Kind::Stop(s) => {
                assert!(s.failed);
                assert!(
                    s.reason.contains("replicas diverged at step 1"),
                    "{}",
                    s.reason
                );
            }
            other => panic!("expected Stop, got {other:?}"),
        }
    });
    let err = outcome.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("replicas diverged"), "{err}");
}

#[test]
fn a_silent_worker_is_dropped_within_the_heartbeat_timeout() {
    let mut s = settings(2, 100);
    s.heartbeat_timeout = Duration::from_millis(600);
    s.rendezvous_timeout = Duration::from_millis(1500);
    let (url, _store, outcome) = start(s);
    let started = std::time::Instant::now();
    rt().block_on(async {
        let mut a = open(&url, join_msg("a")).await.unwrap();
        let _b = open(&url, join_msg("b")).await.unwrap();
        assert!(matches!(a.command().await, pb::command::Kind::Start(_)));
        // `a` keeps beating, `b` never does: `a` is told to halt once `b` is dropped.
        let beat = a.up.clone();
        let beats = tokio::spawn(async move {
            loop {
                let _ = beat.send(pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {})),
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(matches!(a.command().await, pb::command::Kind::Halt(_)));
        assert!(started.elapsed() < Duration::from_secs(2));
        a.halted(1, 0).await.unwrap();
        // One worker is fewer than min_workers: the run waits for another, then gives up.
        match a.command().await {
            pb::command::Kind::Stop(s) => assert!(s.failed, "{s:?}"),
            other => panic!("expected Stop, got {other:?}"),
        }
        beats.abort();
    });
    let err = outcome.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("only 1 of at least 2 workers"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_lost_worker_halts_the_ring_and_it_reforms_then_grows_back() {
    let mut s = settings(3, 100);
    s.min_workers = 2;
    s.checksum_every = 0;
    let (url, store, outcome) = start(s);
    rt().block_on(async {
        let mut a = open(&url, join_msg("a")).await.unwrap();
        let mut b = open(&url, join_msg("b")).await.unwrap();
        let mut c = open(&url, join_msg("c")).await.unwrap();
        for f in [&mut a, &mut b, &mut c] {
            assert!(matches!(f.command().await, pb::command::Kind::Start(_)));
        }
        // Steps 0 and 1 complete everywhere; `a` also completed step 2 (its all-gather ended
        // first) before `c` died; `b` did not.
        for step in 0..2 {
            for f in [&mut a, &mut b, &mut c] {
                f.report(1, step, None).await.unwrap();
            }
        }
        a.report(1, 2, None).await.unwrap();
        drop(c);
        for f in [&mut a, &mut b] {
            assert!(matches!(f.command().await, pb::command::Kind::Halt(h) if h.generation == 1));
        }
        a.halted(1, 3).await.unwrap();
        b.halted(1, 2).await.unwrap();
        // `a` holds the furthest state: it is asked for it, and `b` gets it.
        match a.command().await {
            pb::command::Kind::SendState(s) => assert!(!s.persist),
            other => panic!("expected SendState, got {other:?}"),
        }
        let refused = b.upload(1, 3, true).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        a.upload(1, 3, true).await.unwrap();
        let (sa, sb) = match (a.command().await, b.command().await) {
            (pb::command::Kind::Start(sa), pb::command::Kind::Start(sb)) => (sa, sb),
            other => panic!("expected Start, got {other:?}"),
        };
        assert_eq!((sa.generation, sa.world, sa.start_step), (2, 2, 3));
        assert!(sa.checkpoint.is_empty(), "a keeps its own state");
        assert_eq!(sb.checkpoint.len(), 1, "b gets a's state");
        assert_eq!(store.steps.lock().unwrap().len(), 3, "steps 0–2 committed");
        // A newcomer halts the generation and joins the next one with the state.
        let mut d = open(&url, join_msg("d")).await.unwrap();
        for f in [&mut a, &mut b] {
            assert!(matches!(f.command().await, pb::command::Kind::Halt(h) if h.generation == 2));
            f.halted(2, 3).await.unwrap();
        }
        // The state of step 3 is already at hand: no need to ask for it again.
        for (f, files) in [(&mut a, 0), (&mut b, 0), (&mut d, 1)] {
            match f.command().await {
                pb::command::Kind::Start(s) => {
                    assert_eq!((s.generation, s.world, s.start_step), (3, 3, 3));
                    assert_eq!(s.checkpoint.len(), files);
                }
                other => panic!("expected Start, got {other:?}"),
            }
        }
    });
    drop(outcome);
}

#[test]
fn too_few_workers_by_the_rendezvous_timeout_is_a_clear_error() {
    let mut s = settings(3, 10);
    s.min_workers = 2;
    s.rendezvous_timeout = Duration::from_millis(300);
    let (url, _store, outcome) = start(s);
    rt().block_on(async {
        let a = open(&url, join_msg("a")).await.unwrap();
        for _ in 0..20 {
            a.heartbeat();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let err = outcome.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("only 1 of at least 2 workers"), "{err}");
}

#[test]
fn non_finite_steps_commit_and_far_future_reports_are_refused() {
    let (url, store, outcome) = start(settings(2, 10_000));
    rt().block_on(async {
        let mut a = open(&url, join_msg("a")).await.unwrap();
        let mut b = open(&url, join_msg("b")).await.unwrap();
        a.command().await;
        b.command().await;
        // A skipped step reports NaN terms on every replica: that is agreement, not divergence.
        a.report_loss(1, 0, None, f64::NAN).await.unwrap();
        b.report_loss(1, 0, None, f64::NAN).await.unwrap();
        let far = a.report(1, 5000, None).await.unwrap_err();
        assert_eq!(far.code(), Code::InvalidArgument);
        assert!(
            far.message().contains("outside the uncommitted steps"),
            "{far:?}"
        );
        a.report(1, 1, Some(3)).await.unwrap();
        b.report(1, 1, Some(3)).await.unwrap();
    });
    // The scripted workers hang up without halting: the run ends, naming the generation lost.
    let err = outcome.join().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("every worker of generation 1 was lost"),
        "{err}"
    );
    // Steps are recorded in order, off the state machine's lock, by the time the run ends.
    assert_eq!(store.steps.lock().unwrap().len(), 2);
    assert!(store.steps.lock().unwrap()[0].terms["neg_elbo"].is_nan());
}
