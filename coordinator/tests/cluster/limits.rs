//! Per-principal limits (coordinator/src/limits.rs) through the real cluster: a client over its
//! concurrency limit is refused with RESOURCE_EXHAUSTED and retry advice and nothing changes,
//! while another client keeps working; an emptied rate bucket refills; open streams do not
//! hold call slots but have their own cap; `/mcp` answers 429 with `Retry-After`; every
//! refusal is counted on /metrics.

use std::net::SocketAddr;

use heist_coordinator::limits::LimitsConfig;
use heist_proto::{
    errors::{metadata_of, reason, retry_after_of},
    v1::{
        self, audit_service_client::AuditServiceClient, client_service_client::ClientServiceClient,
        session_service_client::SessionServiceClient,
    },
};
use serde_json::json;
use tonic::Code;

use crate::harness::*;

const SCOPES: &[&str] = &[
    "sessions:read",
    "sessions:write",
    "tools:call",
    "audit:read",
];

/// A client created through the admin API, logged in.
async fn client(url: &str, admin: &str, id: &str) -> Client {
    let created = ClientServiceClient::new(channel(url).await)
        .create_client(authed(
            admin,
            v1::CreateClientRequest {
                client_id: id.to_owned(),
                scopes: SCOPES.iter().map(|s| (*s).to_owned()).collect(),
            },
        ))
        .await
        .expect("create client")
        .into_inner();
    let token = issue_token(url, id, &created.client_secret)
        .await
        .expect("token");
    Client::with_token(url, token).await
}

async fn list_sessions(c: &mut Client) -> Result<Vec<v1::Session>, tonic::Status> {
    c.sessions
        .list_sessions(authed(&c.token, v1::ListSessionsRequest::default()))
        .await
        .map(|r| r.into_inner().sessions)
}

/// Checks a refusal by `limit`: the code, the reason, the limit named in the metadata and the
/// message, and both forms of retry advice.
fn assert_limited(err: &tonic::Status, limit: &str, variable: &str) {
    assert_status(err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(metadata_of(err, "limit").as_deref(), Some(limit), "{err:?}");
    assert!(err.message().contains(variable), "{}", err.message());
    let delay = retry_after_of(err).expect("RetryInfo in the details");
    assert!(!delay.is_zero(), "{delay:?}");
    let header = err
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("a retry-after value in seconds");
    assert!(header >= 1, "{header}");
}

/// POST /mcp (a tools/list request) with `token`: the status line, headers and body as text.
async fn mcp_raw(addr: SocketAddr, token: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         MCP-Protocol-Version: 2025-06-18\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    String::from_utf8_lossy(&raw).into_owned()
}

/// The value of `heist_limited_calls_total{limit="…"}` on /metrics.
async fn limited_total(addr: SocketAddr, admin: &str, limit: &str) -> u64 {
    let (status, body) = http(
        addr,
        "GET",
        "/metrics",
        &format!("Authorization: Bearer {admin}\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let series = format!("heist_limited_calls_total{{limit=\"{limit}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_concurrency_limit_a_client_is_refused_and_others_keep_working() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.limits = LimitsConfig {
        max_concurrent_calls: 1,
        ..LimitsConfig::default()
    };
    let coord = Coordinator::start(config).await;
    let url = coord.url();
    let w = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let mut admin = Client::admin(&url).await;
    admin.wait_ready(&["w1"]).await;
    let mut alice = client(&url, &admin.token, "alice").await;
    let mut bob = client(&url, &admin.token, "bob").await;
    let session = alice.create_session(&[]).await.expect("alice's session");

    // Alice's one call slot is taken by a slow call.
    let mut slow = alice.clone();
    let id = session.id.clone();
    let in_flight = tokio::spawn(async move {
        slow.call(&id, "echo", json!({"delay_ms": 60_000, "payload": "slow"}))
            .await
    });
    wait_for("alice's slow call to be in flight on the worker", || {
        let mut admin = admin.clone();
        async move {
            let w = admin.workers().await.into_iter().find(|w| w.id == "w1")?;
            (w.in_flight_calls > 0).then_some(())
        }
    })
    .await;

    // Her next call is refused before it runs: no session is created.
    let err = alice.create_session(&[]).await.expect_err("over the limit");
    assert_limited(
        &err,
        "concurrent_calls",
        "HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS",
    );
    assert_eq!(metadata_of(&err, "client_id").as_deref(), Some("alice"));
    // /mcp is limited the same way: 429 with Retry-After and the reason as text.
    let raw = mcp_raw(coord.addr, &alice.token).await;
    assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{raw}"
    );
    assert!(
        raw.contains("HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS"),
        "{raw}"
    );

    // Bob, meanwhile, is not slowed by Alice's limit: his own calls run.
    let bobs = bob.create_session(&[]).await.expect("bob's session");
    let resp = bob
        .call(&bobs.id, "echo", json!({"payload": "bob"}))
        .await
        .expect("bob's call");
    assert_eq!(structured(&resp)["payload"], json!("bob"));
    assert!(
        !mcp_raw(coord.addr, &bob.token)
            .await
            .starts_with("HTTP/1.1 429")
    );

    // The slow call given up frees the slot; then Alice is served again, and the refused
    // create left nothing behind.
    in_flight.abort();
    let sessions = wait_for("alice's slot to be free again", || {
        let mut alice = alice.clone();
        async move { list_sessions(&mut alice).await.ok() }
    })
    .await;
    assert_eq!(
        sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![session.id.as_str()]
    );
    assert!(limited_total(coord.addr, &admin.token, "concurrent_calls").await >= 2);

    w.stop().await;
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_rate_bucket_refills() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.limits = LimitsConfig {
        calls_per_s: 2,
        burst: 5,
        ..LimitsConfig::default()
    };
    let coord = Coordinator::start(config).await;
    let url = coord.url();
    let admin = Client::admin(&url).await;
    let mut alice = client(&url, &admin.token, "alice").await;
    let mut bob = client(&url, &admin.token, "bob").await;

    // Alice spends her bucket; the refusal says when a token will be back.
    let mut served = 0;
    let err = loop {
        match list_sessions(&mut alice).await {
            Ok(_) => served += 1,
            Err(err) => break err,
        }
        assert!(served < 100, "the rate limit never refused");
    };
    assert!(served >= 5, "the burst is served first: {served}");
    assert_limited(&err, "rate", "HEIST_PRINCIPAL_CALLS_PER_S");
    let delay = retry_after_of(&err).expect("RetryInfo");
    assert!(
        delay <= std::time::Duration::from_millis(500),
        "one token comes back within 1/rate: {delay:?}"
    );
    // Bob's bucket is his own.
    list_sessions(&mut bob)
        .await
        .expect("bob is not limited by alice");

    // /mcp answers 429 while her bucket is empty.
    let raw = wait_for("a 429 from /mcp with alice's bucket empty", || {
        let (mut alice, addr) = (alice.clone(), coord.addr);
        async move {
            while list_sessions(&mut alice).await.is_ok() {}
            let raw = mcp_raw(addr, &alice.token).await;
            raw.starts_with("HTTP/1.1 429").then_some(raw)
        }
    })
    .await;
    assert!(
        raw.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{raw}"
    );

    // The bucket refills: she is served again without anyone resetting anything.
    wait_for("alice's bucket to refill", || {
        let mut alice = alice.clone();
        async move { list_sessions(&mut alice).await.ok() }
    })
    .await;
    assert!(limited_total(coord.addr, &admin.token, "rate").await >= 2);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_hold_no_call_slot_but_have_their_own_cap() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.limits = LimitsConfig {
        max_concurrent_calls: 1,
        max_open_streams: 1,
        ..LimitsConfig::default()
    };
    let coord = Coordinator::start(config).await;
    let url = coord.url();
    let admin = Client::admin(&url).await;
    let mut alice = client(&url, &admin.token, "alice").await;
    let tail = |token: String| {
        let url = url.clone();
        async move {
            AuditServiceClient::new(channel(&url).await)
                .tail_audit(authed(&token, v1::TailAuditRequest::default()))
                .await
        }
    };

    // A tail held open does not use the one call slot: unary calls still run, again and again.
    let open = tail(alice.token.clone()).await.expect("first stream");
    for _ in 0..3 {
        list_sessions(&mut alice)
            .await
            .expect("a call next to the open stream");
    }
    // A second stream is over the stream cap.
    let err = tail(alice.token.clone()).await.expect_err("second stream");
    assert_limited(&err, "open_streams", "HEIST_PRINCIPAL_MAX_OPEN_STREAMS");

    // Closing the first frees its slot.
    drop(open);
    let again = wait_for("the stream slot to be free again", || {
        let tail = tail(alice.token.clone());
        async move { tail.await.ok() }
    })
    .await;
    assert!(limited_total(coord.addr, &admin.token, "open_streams").await >= 1);
    // The admin, another principal, never shared alice's slots.
    SessionServiceClient::new(channel(&url).await)
        .list_sessions(authed(&admin.token, v1::ListSessionsRequest::default()))
        .await
        .expect("admin call");
    drop(again);
    coord.stop().await;
}
