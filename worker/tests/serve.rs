//! The real worker (`heist_worker::serve`) against a tiny in-process fake coordinator: joining,
//! health, reflection, credential checks, tool calls over gRPC, and a drain that lets an
//! in-flight call finish.

use std::{net::SocketAddr, path::Path, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    errors, json, metadata,
    token::TokenSigner,
    v1::{
        Accepted, CallToolRequest, CoordinatorMessage, OpenSessionRequest, WorkerMessage,
        content_block::Block,
        coordinator_message,
        worker_control_server::{WorkerControl, WorkerControlServer},
        worker_message,
        worker_service_client::WorkerServiceClient,
    },
};
use heist_worker::Config;
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Code, Request, Status, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Deadline for every "wait until" in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

/// What the fake coordinator saw. (A handful of events per test: their size does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Seen {
    Message(worker_message::Msg),
    Rejected,
    Closed,
}

struct FakeCoordinator {
    public_key: Vec<u8>,
    join_token: &'static str,
    seen: mpsc::UnboundedSender<Seen>,
}

#[tonic::async_trait]
impl WorkerControl for FakeCoordinator {
    type JoinStream = BoxStream<'static, Result<CoordinatorMessage, Status>>;

    async fn join(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<tonic::Response<Self::JoinStream>, Status> {
        let token = request
            .metadata()
            .get(metadata::JOIN_TOKEN)
            .and_then(|v| v.to_str().ok());
        if token != Some(self.join_token) {
            let _ = self.seen.send(Seen::Rejected);
            return Err(Status::unauthenticated("wrong join token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Accepted(Accepted {
                lease_ttl_ms: 10_000,
                heartbeat_interval_ms: 50,
                coordinator_public_key: self.public_key.clone(),
                credential_audience: "heist-worker:w1".to_owned(),
                credential_issuer: "heist-test".to_owned(),
            })),
        }))
        .expect("queue Accepted");
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(msg) = message.msg {
                    let _ = seen.send(Seen::Message(msg));
                }
            }
            let _ = seen.send(Seen::Closed);
            drop(tx);
        });
        Ok(tonic::Response::new(
            UnboundedReceiverStream::new(rx).boxed(),
        ))
    }
}

async fn start_coordinator(
    public_key: Vec<u8>,
    join_token: &'static str,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen, rx) = mpsc::unbounded_channel();
    let fake = FakeCoordinator {
        public_key,
        join_token,
        seen,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerControlServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

async fn wait_for<T>(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    mut pick: impl FnMut(&Seen) -> Option<T>,
) -> T {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = seen.recv().await.expect("coordinator events");
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    })
    .await
    .expect("event before the deadline")
}

async fn wait_health(channel: Channel, want: ServingStatus) {
    let mut health = HealthClient::new(channel);
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: "heist.v1.WorkerService".to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(DEADLINE, async {
        while let Some(status) = statuses.message().await.expect("health stream") {
            if status.status == want as i32 {
                return;
            }
        }
        panic!("health stream ended");
    })
    .await
    .expect("health before the deadline");
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        metadata::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

fn call(session: &str, tool: &str, args: serde_json::Value) -> CallToolRequest {
    CallToolRequest {
        session_id: session.to_owned(),
        tool: tool.to_owned(),
        arguments: json::json_to_struct(&args),
        request_id: String::new(),
    }
}

fn first_text(response: &heist_proto::v1::CallToolResponse) -> &str {
    match response.content.first().and_then(|c| c.block.as_ref()) {
        Some(Block::Text(text)) => text,
        other => panic!("no text block: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tools_checks_credentials_and_drains() {
    let signer =
        TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer");
    let (coordinator, mut seen) = start_coordinator(signer.public_key().to_vec(), "jt").await;
    let workspaces = tempfile::tempdir().expect("tempdir");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        worker_id: "w1".to_owned(),
        coordinator_addr: format!("http://{coordinator}"),
        join_token: "jt".to_owned(),
        base_workspace: workspaces.path().to_path_buf(),
        max_sessions: 2,
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(50),
        ..Config::default()
    };
    let worker = tokio::spawn(heist_worker::serve(listener, config, async {
        let _ = shutdown_rx.await;
    }));

    let register = wait_for(&mut seen, |e| match e {
        Seen::Message(worker_message::Msg::Register(r)) => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(register.worker_id, "w1");
    assert_eq!(register.advertise_addr, format!("http://{addr}"));
    assert_eq!(register.capacity, 2);

    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    wait_health(channel.clone(), ServingStatus::Serving).await;
    let mut client = WorkerServiceClient::new(channel.clone());

    // Credentials: none, a client token (wrong audience), then the coordinator's.
    let open = || OpenSessionRequest {
        session_id: "s-1".to_owned(),
        owner: "alice".to_owned(),
    };
    let err = client.open_session(open()).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let ttl = Duration::from_secs(300);
    let client_token = signer
        .sign(&TokenSigner::claims(
            "heist-test",
            "heist",
            "alice",
            "admin",
            ttl,
        ))
        .expect("sign");
    let err = client
        .open_session(authed(open(), &client_token))
        .await
        .expect_err("client token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let token = signer
        .sign(&TokenSigner::claims(
            "heist-test",
            "heist-worker:w1",
            "coordinator",
            "",
            ttl,
        ))
        .expect("sign");
    let opened = client
        .open_session(authed(open(), &token))
        .await
        .expect("open")
        .into_inner();
    let workspace = Path::new(&opened.workspace).to_path_buf();
    assert!(workspace.is_dir());

    // Tools over the wire.
    let echoed = client
        .call_tool(authed(
            call("s-1", "echo", json!({"x": [1, "two"]})),
            &token,
        ))
        .await
        .expect("echo")
        .into_inner();
    assert_eq!(echoed.worker_id, "w1");
    assert!(!echoed.is_error);
    assert_eq!(
        echoed.structured_content.as_ref().map(json::struct_to_json),
        Some(json!({"x": [1, "two"]}))
    );
    client
        .call_tool(authed(
            call(
                "s-1",
                "fs.write",
                json!({"path": "a/b.txt", "content": "hi"}),
            ),
            &token,
        ))
        .await
        .expect("write");
    let read = client
        .call_tool(authed(
            call("s-1", "fs.read", json!({"path": "a/b.txt"})),
            &token,
        ))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(first_text(&read), "hi");
    let err = client
        .call_tool(authed(call("s-1", "fs.read", json!({"path": 5})), &token))
        .await
        .expect_err("schema");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(errors::metadata_of(&err, "field").as_deref(), Some("path"));
    let err = client
        .call_tool(authed(
            call("s-1", "fs.read", json!({"path": "../../etc/passwd"})),
            &token,
        ))
        .await
        .expect_err("outside");
    assert_eq!(
        errors::reason_of(&err).as_deref(),
        Some(errors::reason::PATH_OUTSIDE_WORKSPACE)
    );
    let err = client
        .call_tool(authed(call("s-404", "echo", json!({})), &token))
        .await
        .expect_err("unknown session");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        errors::reason_of(&err).as_deref(),
        Some(errors::reason::SESSION_NOT_FOUND)
    );

    // Drain: a read of a FIFO blocks until something writes it, so the call is in flight while
    // shutdown starts; it must finish successfully.
    let fifo = workspace.join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let blocked = {
        let mut client = client.clone();
        let request = authed(call("s-1", "fs.read", json!({"path": "pipe"})), &token);
        tokio::spawn(async move { client.call_tool(request).await })
    };
    wait_for(&mut seen, |e| match e {
        Seen::Message(worker_message::Msg::Heartbeat(hb)) if hb.in_flight_calls == 1 => Some(()),
        _ => None,
    })
    .await;
    shutdown_tx.send(()).expect("shutdown");
    let going_away = wait_for(&mut seen, |e| match e {
        Seen::Message(worker_message::Msg::GoingAway(g)) => Some(g.reason.clone()),
        _ => None,
    })
    .await;
    assert!(!going_away.is_empty());
    wait_health(channel.clone(), ServingStatus::NotServing).await;

    // While draining: calls for open sessions still work, new sessions are refused.
    client
        .call_tool(authed(
            call("s-1", "calc", json!({"expression": "6*7"})),
            &token,
        ))
        .await
        .expect("calc while draining");
    let err = client
        .open_session(authed(
            OpenSessionRequest {
                session_id: "s-2".to_owned(),
                owner: "alice".to_owned(),
            },
            &token,
        ))
        .await
        .expect_err("draining");
    assert_eq!(err.code(), Code::Unavailable);

    // Release the blocked read: it completes, then the worker finishes shutting down.
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut pipe = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open fifo");
        pipe.write_all(b"drained").expect("write fifo");
    })
    .await
    .expect("writer");
    let response = blocked
        .await
        .expect("task")
        .expect("in-flight call succeeds")
        .into_inner();
    assert_eq!(first_text(&response), "drained");
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("worker stops")
        .expect("task")
        .expect("serve");
    wait_for(&mut seen, |e| matches!(e, Seen::Closed).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_join_token_is_retried_and_never_serves() {
    let (coordinator, mut seen) = start_coordinator(vec![0; 32], "right").await;
    let workspaces = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        worker_id: "w1".to_owned(),
        coordinator_addr: format!("http://{coordinator}"),
        join_token: "wrong".to_owned(),
        base_workspace: workspaces.path().to_path_buf(),
        reconnect_min: Duration::from_millis(5),
        reconnect_max: Duration::from_millis(20),
        ..Config::default()
    };
    let worker = tokio::spawn(heist_worker::serve(listener, config, async {
        let _ = shutdown_rx.await;
    }));
    for _ in 0..2 {
        wait_for(&mut seen, |e| matches!(e, Seen::Rejected).then_some(())).await;
    }
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(status.status, ServingStatus::NotServing as i32);
    let err = WorkerServiceClient::new(channel)
        .call_tool(call("s-1", "echo", json!({})))
        .await
        .expect_err("not registered");
    assert_eq!(err.code(), Code::Unavailable);

    shutdown_tx.send(()).expect("shutdown");
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("worker stops")
        .expect("task")
        .expect("serve");
}
