//! The control loop against a scripted fake coordinator, on paused time: registration content,
//! heartbeats, Drain, Evict, GoingAway, reconnect backoff and re-registration.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use heist_proto::{
    credential::CallKey,
    metadata,
    token::{TokenSigner, call_digest},
    v1::{Accepted, Drain, Evict},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::{
    sessions::Sessions,
    tools::{Limits, Registry},
};

enum Reply {
    Fail(Status),
    Accept,
}

/// The coordinator's end of one accepted stream.
struct Link {
    from_worker: mpsc::Receiver<WorkerMessage>,
    to_worker: mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
}

struct Attempt {
    at: Instant,
    register: Register,
    link: Option<Link>,
}

struct Fake {
    script: Mutex<VecDeque<Reply>>,
    attempts: mpsc::UnboundedSender<Attempt>,
}

impl Connector for Fake {
    fn connect(&self, register: WorkerMessage) -> BoxFuture<'_, Result<ControlStream, Status>> {
        let reply = self
            .script
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or_else(|| Reply::Fail(Status::unavailable("script exhausted")));
        let Some(worker_message::Msg::Register(register)) = register.msg else {
            panic!("the first message must be Register");
        };
        let at = Instant::now();
        let result = match reply {
            Reply::Fail(status) => {
                let _ = self.attempts.send(Attempt {
                    at,
                    register,
                    link: None,
                });
                Err(status)
            }
            Reply::Accept => {
                let (outbound, from_worker) = mpsc::channel(16);
                let (to_worker, inbound) = mpsc::unbounded_channel();
                let _ = self.attempts.send(Attempt {
                    at,
                    register,
                    link: Some(Link {
                        from_worker,
                        to_worker,
                    }),
                });
                Ok(ControlStream {
                    outbound,
                    inbound: UnboundedReceiverStream::new(inbound).boxed(),
                })
            }
        };
        Box::pin(async move { result })
    }
}

struct Harness {
    state: Arc<State>,
    attempts: mpsc::UnboundedReceiver<Attempt>,
    going_away: watch::Sender<Option<String>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

const MIN: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_millis(1600);

async fn start(script: Vec<Reply>, open: &[&str]) -> Harness {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sessions = Sessions::load(tmp.path(), 8).await.expect("sessions");
    for id in open {
        sessions
            .open(
                SessionId::parse(*id).expect("id"),
                &crate::sessions::NoHooks,
            )
            .await
            .expect("open");
    }
    let state = Arc::new(State::new(
        heist_proto::ids::WorkerId::parse("w1").expect("id"),
        sessions,
        Registry::builtin().expect("tools"),
        Limits {
            max_file_bytes: 1024,
            max_list_entries: 10,
        },
        tonic_health::server::HealthReporter::new(),
    ));
    let (tx, attempts) = mpsc::unbounded_channel();
    let fake = Fake {
        script: Mutex::new(script.into()),
        attempts: tx,
    };
    let (going_away, going_away_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let control = Control::new(
        Arc::clone(&state),
        Box::new(fake),
        Backoff::new(MIN, MAX, fastrand::Rng::with_seed(42)),
        ControlSettings {
            advertise_addr: "http://127.0.0.1:1".to_owned(),
            capacity: 8,
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            key: Arc::new(heist_proto::identity::WorkerKey::from_seed(&[3; 32])),
        },
        going_away_rx,
        stop.clone(),
    );
    let task = tokio::spawn(control.run());
    Harness {
        state,
        attempts,
        going_away,
        stop,
        task,
        _tmp: tmp,
    }
}

impl Harness {
    async fn attempt(&mut self) -> Attempt {
        self.attempts.recv().await.expect("an attempt")
    }

    async fn finish(self) {
        self.stop.cancel();
        self.task.await.expect("control task");
    }
}

/// The coordinator's answer to `register`, and the call key it agreed.
fn accepted(
    signer: &TokenSigner,
    heartbeat_ms: u64,
    register: &Register,
) -> (Result<CoordinatorMessage, Status>, CallKey) {
    let share = KeyShare::generate().expect("share");
    let public = share.public();
    let key = share
        .agree_as_coordinator(&register.credential_key_share, &register.worker_id)
        .expect("agree");
    let msg = Ok(CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Accepted(Accepted {
            lease_ttl_ms: 10_000,
            heartbeat_interval_ms: heartbeat_ms,
            coordinator_public_key: signer.public_key().to_vec(),
            credential_audience: "heist-worker:w1".to_owned(),
            credential_issuer: "heist".to_owned(),
            retired_keys: Vec::new(),
            credential_key_share: public.to_vec(),
            credential_ttl_ms: 30_000,
        })),
    });
    (msg, key)
}

/// A CancelTurn request carrying a credential made with `key`.
fn credentialed(key: &CallKey) -> tonic::Request<heist_proto::v1::WorkerCancelTurnRequest> {
    let msg = heist_proto::v1::WorkerCancelTurnRequest {
        turn_id: "t-1".to_owned(),
    };
    let digest = call_digest("CancelTurn", "", &prost::Message::encode_to_vec(&msg));
    let token = key.mint(&digest, Duration::from_secs(30)).expect("mint");
    let mut request = tonic::Request::new(msg);
    request.metadata_mut().insert(
        metadata::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

fn signer() -> TokenSigner {
    TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer")
}

async fn next_heartbeat(link: &mut Link) -> Heartbeat {
    loop {
        match link.from_worker.recv().await.and_then(|m| m.msg) {
            Some(worker_message::Msg::Heartbeat(hb)) => return hb,
            Some(_) => continue,
            None => panic!("stream closed while waiting for a heartbeat"),
        }
    }
}

fn gaps(attempts: &[Attempt]) -> Vec<Duration> {
    attempts.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(start_paused = true)]
async fn reconnects_with_capped_exponential_backoff() {
    let script = (0..8)
        .map(|_| Reply::Fail(Status::unavailable("down")))
        .collect();
    let mut h = start(script, &[]).await;
    let mut attempts = Vec::new();
    for _ in 0..8 {
        attempts.push(h.attempt().await);
    }
    let bases = [100u64, 200, 400, 800, 1600, 1600, 1600];
    for (gap, base) in gaps(&attempts).into_iter().zip(bases) {
        let base = Duration::from_millis(base);
        assert!(
            gap >= base / 2 && gap <= base,
            "gap {gap:?} for base {base:?}"
        );
    }
    h.finish().await;
}

#[tokio::test(start_paused = true)]
async fn join_token_rejections_retry_at_the_cap() {
    let script = (0..4)
        .map(|_| Reply::Fail(Status::unauthenticated("wrong join token")))
        .collect();
    let mut h = start(script, &[]).await;
    let mut attempts = Vec::new();
    for _ in 0..4 {
        attempts.push(h.attempt().await);
    }
    for gap in gaps(&attempts) {
        assert!(gap >= MAX / 2 && gap <= MAX, "gap {gap:?}");
    }
    h.finish().await;
}

#[tokio::test(start_paused = true)]
async fn registers_heartbeats_and_obeys_commands() {
    let coordinator = signer();
    let mut h = start(vec![Reply::Accept, Reply::Accept], &["s-a", "s-b"]).await;

    let first = h.attempt().await;
    let register = &first.register;
    assert_eq!(register.worker_id, "w1");
    assert_eq!(register.advertise_addr, "http://127.0.0.1:1");
    assert_eq!(register.capacity, 8);
    assert_eq!(register.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(register.open_session_ids, ["s-a", "s-b"]);
    assert_eq!(register.sandbox_backend, "none");
    assert_eq!(register.version, heist_proto::VERSION);
    assert!(!register.draining);
    let echo = register
        .tools
        .iter()
        .find(|t| t.name == "echo")
        .expect("echo");
    assert!(echo.input_schema.is_some() && echo.read_only);

    // The call-key share is signed with the worker's identity key.
    let identity = register.identity.as_ref().expect("identity");
    heist_proto::identity::Proof::from_parts(
        &identity.public_key,
        identity.signed_at_ms,
        &identity.nonce,
        &identity.signature,
    )
    .expect("proof")
    .verify(
        heist_proto::identity::PURPOSE_REGISTER,
        "w1",
        &heist_proto::identity::register_bound(
            &register.advertise_addr,
            &register.credential_key_share,
        ),
        Duration::from_secs(60),
    )
    .expect("the share is bound into the registration proof");

    let (reply, call_key) = accepted(&coordinator, 100, &first.register);
    let mut link = first.link.expect("accepted link");
    link.to_worker.send(reply).expect("send");
    let hb = next_heartbeat(&mut link).await;
    assert_eq!((hb.active_sessions, hb.in_flight_calls), (2, 0));

    // Credentials made with the agreed key now verify.
    h.state
        .auth
        .check_call(&credentialed(&call_key), "CancelTurn")
        .await
        .expect("the agreed key");

    // Evict removes the session; the next heartbeats report it.
    let evict = Evict {
        session_ids: vec!["s-a".to_owned()],
    };
    link.to_worker
        .send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Evict(evict)),
        }))
        .expect("send");
    while next_heartbeat(&mut link).await.active_sessions != 1 {}
    assert_eq!(h.state.sessions.ids(), ["s-b"]);

    // Drain stops new sessions.
    link.to_worker
        .send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Drain(Drain {})),
        }))
        .expect("send");
    next_heartbeat(&mut link).await;
    assert!(h.state.sessions.is_draining());

    // The coordinator goes away: the worker reconnects quickly (backoff was reset by Accepted)
    // and re-registers with the sessions it still holds.
    let broke_at = Instant::now();
    drop(link);
    let second = h.attempt().await;
    assert!(
        second.at - broke_at <= MIN,
        "reconnected after {:?}",
        second.at - broke_at
    );
    assert_eq!(second.register.open_session_ids, ["s-b"]);
    assert!(second.register.draining);

    // GoingAway is sent as soon as shutdown starts, and stop closes the stream.
    let (reply, second_key) = accepted(&coordinator, 100, &second.register);
    assert_ne!(
        second_key.id(),
        call_key.id(),
        "every registration agrees a new key"
    );
    let mut link = second.link.expect("accepted link");
    link.to_worker.send(reply).expect("send");
    next_heartbeat(&mut link).await;
    for key in [&second_key, &call_key] {
        h.state
            .auth
            .check_call(&credentialed(key), "CancelTurn")
            .await
            .expect("the new key, and the previous one for calls on their way");
    }
    h.going_away
        .send(Some("SIGTERM".to_owned()))
        .expect("going away");
    loop {
        match link.from_worker.recv().await.and_then(|m| m.msg) {
            Some(worker_message::Msg::GoingAway(g)) => {
                assert_eq!(g.reason, "SIGTERM");
                break;
            }
            Some(_) => continue,
            None => panic!("closed before GoingAway"),
        }
    }
    h.stop.cancel();
    drop(link.to_worker);
    while link.from_worker.recv().await.is_some() {}
    h.task.await.expect("control task");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_never_accepts_is_retried() {
    let mut h = start(
        vec![Reply::Accept, Reply::Fail(Status::unavailable("down"))],
        &[],
    )
    .await;
    let first = h.attempt().await;
    let _link = first.link.expect("link");
    // No Accepted: the worker gives up after ACCEPT_TIMEOUT and backs off.
    let second = h.attempt().await;
    let waited = second.at - first.at;
    assert!(
        waited >= ACCEPT_TIMEOUT && waited <= ACCEPT_TIMEOUT + MIN,
        "{waited:?}"
    );
    h.finish().await;
}
