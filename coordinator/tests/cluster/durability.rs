//! Process-level: the coordinator killed with SIGKILL and restarted; a worker drained by SIGTERM.

use std::process::Command;

use heist_proto::v1;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn a_killed_coordinator_restarts_with_sessions_intact_and_workers_back() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("coordinator");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coord = coordinator_process(port, &data, &dir.path().join("c1.log")).await;

    let w1 = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let w2 = Worker::start(&url, dir.path(), WorkerOpts::new("w2")).await;
    let mut client = Client::admin(&url).await;
    client.wait_ready(&["w1", "w2"]).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let s = client.create_session(&[]).await.expect("create");
        client
            .call(
                &s.id,
                "fs.write",
                json!({"path": "state.txt", "content": format!("session {i}")}),
            )
            .await
            .expect("write");
        ids.push(s.id);
    }
    let closed = client.create_session(&[]).await.expect("create");
    client.close_session(&closed.id).await.expect("close");

    // kill -9: no flush, no goodbye.
    coord.0.kill().expect("SIGKILL");
    coord.0.wait().expect("reap");

    coord = coordinator_process(port, &data, &dir.path().join("c2.log")).await;
    // The old token still verifies: the signing key is durable.
    let mut client = Client::with_token(&url, client.token.clone()).await;
    client.wait_ready(&["w1", "w2"]).await;

    for (i, id) in ids.iter().enumerate() {
        let s = wait_for("session re-attached", || {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                let s = c.get_session(&id).await.ok()?;
                s.worker_connected.then_some(s)
            }
        })
        .await;
        assert_eq!(s.state, v1::SessionState::Ready as i32, "{s:?}");
        let read = client
            .call(id, "fs.read", json!({"path": "state.txt"}))
            .await
            .expect("read");
        assert_eq!(text_of(&read), format!("session {i}"));
    }
    let after = client
        .get_session(&closed.id)
        .await
        .expect("closed session kept");
    assert_eq!(after.state, v1::SessionState::Closed as i32);
    let listed = client
        .sessions
        .list_sessions(authed(&client.token, v1::ListSessionsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 4);
    // New work still places.
    client
        .create_session(&[])
        .await
        .expect("create after restart");
    w1.stop().await;
    w2.stop().await;
    drop(coord);
}

#[tokio::test]
async fn a_restarted_worker_reconciles_its_sessions_with_the_coordinator() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let keep = client.create_session(&[]).await.expect("keep");
    let closed_meanwhile = client.create_session(&[]).await.expect("closed");
    let lost = client.create_session(&[]).await.expect("lost");
    client
        .call(
            &keep.id,
            "fs.write",
            json!({"path": "f", "content": "kept"}),
        )
        .await
        .expect("write");
    let keep_ws = w.workspace(&keep.id);
    let closed_ws = w.workspace(&closed_meanwhile.id);
    let lost_ws = w.workspace(&lost.id);
    w.crash();
    client
        .wait_worker_state("w1", v1::WorkerState::Suspect)
        .await;

    // While the worker is away: one session is closed, one workspace vanishes from its disk.
    let c = client
        .close_session(&closed_meanwhile.id)
        .await
        .expect("close while away");
    assert_eq!(c.state, v1::SessionState::Closed as i32);
    let err = client
        .call(&keep.id, "echo", json!({}))
        .await
        .expect_err("worker away");
    assert_status(
        &err,
        tonic::Code::Unavailable,
        heist_proto::errors::reason::WORKER_UNAVAILABLE,
    );
    std::fs::remove_dir_all(&lost_ws).expect("remove");

    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    client.wait_ready(&["w1"]).await;
    // Re-attached, evicted, failed.
    let read = client
        .call(&keep.id, "fs.read", json!({"path": "f"}))
        .await
        .expect("re-attached");
    assert_eq!(text_of(&read), "kept");
    assert!(keep_ws.is_dir());
    wait_for("the closed session's workspace to be evicted", || {
        let gone = !closed_ws.exists();
        async move { gone.then_some(()) }
    })
    .await;
    let l = client.get_session(&lost.id).await.expect("lost");
    assert_eq!(l.state, v1::SessionState::Failed as i32, "{l:?}");
    assert!(!l.failure_reason.is_empty());
    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn a_gracefully_restarted_coordinator_gets_its_workers_back() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("c");
    let coord = Coordinator::start(coordinator_config(&data)).await;
    let addr = coord.addr;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let s = client.create_session(&[]).await.expect("session");
    coord.stop().await;

    let coord = Coordinator::start_on(&addr.to_string(), coordinator_config(&data)).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let got = client.get_session(&s.id).await.expect("session survived");
    assert_eq!(got.state, v1::SessionState::Ready as i32);
    client
        .call(&s.id, "echo", json!({"ok": true}))
        .await
        .expect("routed after restart");
    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn sigterm_drains_a_worker_without_failing_in_flight_calls() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log");
    let child = Command::new(sibling_binary("worker"))
        .env("GRPC_PORT", port.to_string())
        .env("HEIST_BIND_ADDR", "127.0.0.1")
        .env("WORKER_ID", "w-term")
        .env("COORDINATOR_ADDR", coord.url())
        .env("BASE_WORKSPACE", dir.path().join("ws"))
        .env("HEIST_JOIN_TOKEN", JOIN_TOKEN)
        .env("HEIST_DRAIN_TIMEOUT_S", "20")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn worker");
    let mut worker = ChildGuard(child);
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w-term"]).await;
    let session = client.create_session(&[]).await.expect("session");

    // A call that takes a while is in flight when SIGTERM lands.
    let mut c = client.clone();
    let id = session.id.clone();
    let in_flight = tokio::spawn(async move {
        c.call(
            &id,
            "echo",
            json!({"delay_ms": 1500, "payload": "survives"}),
        )
        .await
    });
    wait_for("the slow call to be in flight on the worker", || {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.into_iter().find(|w| w.id == "w-term")?;
            (w.in_flight_calls > 0).then_some(())
        }
    })
    .await;
    worker.sigterm();

    // It stops taking sessions at once...
    client
        .wait_worker_state("w-term", v1::WorkerState::Draining)
        .await;
    let err = client
        .create_session(&[])
        .await
        .expect_err("draining takes no sessions");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    // ...finishes the call...
    let resp = in_flight
        .await
        .expect("join")
        .expect("in-flight call must not fail");
    assert_eq!(structured(&resp)["payload"], json!("survives"));
    // ...and exits cleanly.
    let exit = wait_for("worker exit", || {
        let st = worker.0.try_wait().ok().flatten();
        async move { st }
    })
    .await;
    assert!(exit.success(), "worker exited with {exit}");
    client
        .wait_worker_state("w-term", v1::WorkerState::Gone)
        .await;
    coord.stop().await;
}
