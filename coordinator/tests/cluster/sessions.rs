//! Placement, session lifecycle, labels, capacity, paging and idempotent creation.

use std::collections::HashMap;

use heist_proto::{errors::reason, v1};
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn sessions_spread_over_two_workers_and_close_removes_workspaces() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w1 = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let w2 = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w2")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1", "w2"]).await;

    let mut sessions = Vec::new();
    for _ in 0..6 {
        let s = client.create_session(&[]).await.expect("create");
        assert_eq!(s.state, v1::SessionState::Ready as i32);
        assert_eq!(s.owner, ADMIN_ID);
        assert!(s.worker_connected);
        sessions.push(s);
    }
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for s in &sessions {
        *per_worker.entry(s.worker_id.clone()).or_default() += 1;
        let w = if s.worker_id == "w1" { &w1 } else { &w2 };
        assert!(w.workspace(&s.id).is_dir(), "workspace of {} missing", s.id);
    }
    assert_eq!(per_worker.get("w1"), Some(&3), "{per_worker:?}");
    assert_eq!(per_worker.get("w2"), Some(&3), "{per_worker:?}");

    // Get and list see the same sessions.
    let got = client.get_session(&sessions[0].id).await.expect("get");
    assert_eq!(got.worker_id, sessions[0].worker_id);

    // Paged listing returns every session exactly once, newest first.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .sessions
            .list_sessions(authed(
                &client.token,
                v1::ListSessionsRequest {
                    page_size: 4,
                    page_token: page_token.clone(),
                    include_closed: false,
                },
            ))
            .await
            .expect("list")
            .into_inner();
        assert!(resp.sessions.len() <= 4);
        seen.extend(resp.sessions.into_iter().map(|s| s.id));
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    let mut want: Vec<String> = sessions.iter().map(|s| s.id.clone()).collect();
    want.reverse();
    assert_eq!(seen, want);

    // Closing removes the workspace; closing again returns the closed session.
    let first = &sessions[0];
    let closed = client.close_session(&first.id).await.expect("close");
    assert_eq!(closed.state, v1::SessionState::Closed as i32);
    let w = if first.worker_id == "w1" { &w1 } else { &w2 };
    assert!(!w.workspace(&first.id).exists());
    let again = client.close_session(&first.id).await.expect("close again");
    assert_eq!(again.state, v1::SessionState::Closed as i32);
    // Calls on a closed session are refused with a reason.
    let err = client
        .call(&first.id, "echo", serde_json::json!({"x": 1}))
        .await
        .expect_err("closed session");
    assert_status(&err, Code::FailedPrecondition, reason::SESSION_NOT_READY);

    w1.stop().await;
    w2.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn labels_select_workers_and_unmatched_labels_say_so() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let gpu = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("gpu").label("accel", "gpu"),
    )
    .await;
    let cpu = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("cpu").label("accel", "none"),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["gpu", "cpu"]).await;

    for _ in 0..3 {
        let s = client
            .create_session(&[("accel", "gpu")])
            .await
            .expect("create");
        assert_eq!(s.worker_id, "gpu");
        assert_eq!(s.labels.get("accel").map(String::as_str), Some("gpu"));
    }
    let err = client
        .create_session(&[("accel", "tpu")])
        .await
        .expect_err("no tpu worker");
    assert_status(&err, Code::ResourceExhausted, reason::NO_MATCHING_WORKER);
    assert!(err.message().contains("accel"), "{}", err.message());

    gpu.stop().await;
    cpu.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn capacity_exhaustion_and_no_workers_are_resource_exhausted_with_reasons() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let mut client = Client::admin(&coord.url()).await;

    let err = client.create_session(&[]).await.expect_err("no workers");
    assert_status(&err, Code::ResourceExhausted, reason::NO_WORKERS);

    let w = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("small").capacity(2),
    )
    .await;
    client.wait_ready(&["small"]).await;
    let a = client.create_session(&[]).await.expect("first");
    client.create_session(&[]).await.expect("second");
    let err = client.create_session(&[]).await.expect_err("full");
    assert_status(&err, Code::ResourceExhausted, reason::ALL_WORKERS_FULL);

    // Closing one frees a slot.
    client.close_session(&a.id).await.expect("close");
    client.create_session(&[]).await.expect("slot freed");

    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn unknown_sessions_are_not_found() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;

    let missing = "s-00000000-0000-7000-8000-000000000000";
    let err = client.get_session(missing).await.expect_err("get");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    let err = client.close_session(missing).await.expect_err("close");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    let err = client
        .call(missing, "echo", serde_json::json!({}))
        .await
        .expect_err("call");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    // A malformed id is a bad argument, not a lookup.
    let err = client.get_session("../../etc").await.expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);

    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn create_and_close_with_the_same_request_id_apply_once() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;

    let create = |rid: &str| {
        authed(
            &client.token,
            v1::CreateSessionRequest {
                request_id: rid.into(),
                labels: Default::default(),
                allowed_tools: Vec::new(),
            },
        )
    };
    let a = client
        .sessions
        .clone()
        .create_session(create("req-1"))
        .await
        .expect("a")
        .into_inner();
    let b = client
        .sessions
        .clone()
        .create_session(create("req-1"))
        .await
        .expect("b")
        .into_inner();
    assert_eq!(a.id, b.id, "a retry must return the first session");
    let c = client
        .sessions
        .clone()
        .create_session(create("req-2"))
        .await
        .expect("c")
        .into_inner();
    assert_ne!(a.id, c.id);

    let listed = client
        .sessions
        .list_sessions(authed(&client.token, v1::ListSessionsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 2, "{listed:?}");

    // Same id with different arguments is refused.
    let mut other = create("req-1");
    other.get_mut().labels.insert("k".into(), "v".into());
    let err = client
        .sessions
        .clone()
        .create_session(other)
        .await
        .expect_err("reuse");
    assert_status(&err, Code::InvalidArgument, reason::REQUEST_ID_REUSED);

    w.stop().await;
    coord.stop().await;
}
