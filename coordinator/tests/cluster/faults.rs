//! Process-level faults (issue 12): the coordinator killed with SIGKILL while calls are in
//! flight, and every call retried with its request id.

use std::collections::{BTreeMap, HashSet};

use futures::future::join_all;
use heist_proto::v1;
use serde_json::json;

use crate::harness::*;

/// Appends in flight at the kill, per run.
const APPENDS: usize = 240;
/// Session creates in flight at the kill, per run.
const CREATES: usize = 24;
/// Sessions the appends go to.
const SESSIONS: usize = 4;

fn append_args(i: usize) -> serde_json::Value {
    json!({"path": "log.txt", "content": format!("L{i}\n"), "append": true})
}

async fn create_with_id(c: &mut Client, request_id: &str) -> Result<v1::Session, tonic::Status> {
    c.sessions
        .create_session(authed(
            &c.token,
            v1::CreateSessionRequest {
                request_id: request_id.to_owned(),
                labels: Default::default(),
                allowed_tools: Vec::new(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Session-id-named directories under a worker's base: the workspaces it holds.
fn workspaces(worker: &Worker) -> HashSet<String> {
    std::fs::read_dir(&worker.base_workspace)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("s-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_coordinator_killed_with_calls_in_flight_applies_every_retry_exactly_once() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("coordinator");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coord = coordinator_process(port, &data, &dir.path().join("c1.log")).await;
    let w1 = Worker::start(&url, dir.path(), WorkerOpts::new("w1").capacity(64)).await;
    let w2 = Worker::start(&url, dir.path(), WorkerOpts::new("w2").capacity(64)).await;
    let mut client = Client::admin(&url).await;
    client.wait_ready(&["w1", "w2"]).await;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(client.create_session(&[]).await.expect("create").id);
    }

    // A burst of appends and creates, each with its own request id; SIGKILL lands while many
    // are in flight (some acknowledged, some applied on a worker but not answered, some not
    // yet forwarded).
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..APPENDS {
        let (mut c, session, acked) = (
            client.clone(),
            sessions[i % SESSIONS].clone(),
            acked.clone(),
        );
        calls.push(tokio::spawn(async move {
            let out = c
                .call_with_id(&session, "fs.write", append_args(i), &format!("a-{i}"))
                .await;
            if out.is_ok() {
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            out.is_ok()
        }));
    }
    let mut creates = Vec::new();
    for i in 0..CREATES {
        let mut c = client.clone();
        creates.push(tokio::spawn(async move {
            create_with_id(&mut c, &format!("c-{i}")).await.ok()
        }));
    }
    wait_for("some appends to be acknowledged", || {
        let n = acked.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= APPENDS / 10).then_some(()) }
    })
    .await;
    coord.0.kill().expect("SIGKILL");
    coord.0.wait().expect("reap");
    let acked_before: usize = join_all(calls)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(true)))
        .count();
    let created_before: Vec<Option<v1::Session>> = join_all(creates)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .collect();

    coord = coordinator_process(port, &data, &dir.path().join("c2.log")).await;
    let mut client = Client::with_token(&url, client.token.clone()).await;
    client.wait_ready(&["w1", "w2"]).await;
    for id in &sessions {
        wait_for("session re-attached", || {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                let s = c.get_session(&id).await.ok()?;
                (s.worker_connected && s.state == v1::SessionState::Ready as i32).then_some(())
            }
        })
        .await;
    }

    // Every request retried with its id: each must succeed, none may apply twice. All at once,
    // as a client would after an outage, so some meet the per-session filesystem limit
    // (RESOURCE_EXHAUSTED, nothing done) and retry again after a pause, as a client would.
    let retries = join_all((0..APPENDS).map(|i| {
        let (mut c, session) = (client.clone(), sessions[i % SESSIONS].clone());
        async move {
            let mut pause = std::time::Duration::from_millis(20);
            for _ in 0..40 {
                match c
                    .call_with_id(&session, "fs.write", append_args(i), &format!("a-{i}"))
                    .await
                {
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_millis(500));
                    }
                    other => return other,
                }
            }
            Err(tonic::Status::resource_exhausted(
                "still refused after 40 tries",
            ))
        }
    }))
    .await;
    let mut replayed = 0;
    for (i, r) in retries.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("retry of a-{i}: {e:?}"));
        assert!(!r.is_error, "retry of a-{i}: {r:?}");
        replayed += usize::from(r.replayed);
    }
    let mut lines: BTreeMap<String, usize> = BTreeMap::new();
    for id in &sessions {
        let read = client
            .call(id, "fs.read", json!({"path": "log.txt"}))
            .await
            .expect("read log");
        for line in text_of(&read).lines() {
            *lines.entry(line.to_owned()).or_default() += 1;
        }
    }
    let doubled: Vec<&String> = lines
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(l, _)| l)
        .collect();
    assert!(doubled.is_empty(), "applied twice: {doubled:?}");
    assert_eq!(lines.len(), APPENDS, "every append applied once");

    // Every create retried with its id: the same session for an id answered before the kill,
    // one session per id, and no workspace that no session owns.
    let mut created = HashSet::new();
    for (i, before) in created_before.iter().enumerate() {
        let s = create_with_id(&mut client, &format!("c-{i}"))
            .await
            .unwrap_or_else(|e| panic!("retry of c-{i}: {e:?}"));
        assert_eq!(s.state, v1::SessionState::Ready as i32, "c-{i}: {s:?}");
        if let Some(before) = before {
            assert_eq!(
                before.id, s.id,
                "c-{i} answered twice with different sessions"
            );
        }
        assert!(created.insert(s.id), "two ids got one session");
    }
    let listed: HashSet<String> = client
        .sessions
        .list_sessions(authed(
            &client.token,
            v1::ListSessionsRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        listed.len(),
        SESSIONS + CREATES,
        "no orphan sessions: {listed:?}"
    );
    wait_for(
        "every workspace on the workers to belong to a session",
        || {
            let held: HashSet<String> = workspaces(&w1).union(&workspaces(&w2)).cloned().collect();
            let listed = listed.clone();
            async move { (held == listed).then_some(()) }
        },
    )
    .await;
    println!(
        "coordinator SIGKILL: {APPENDS} appends, {acked_before} acknowledged before the kill, \
         {} answered by replay on retry, 0 doubled, 0 lost; {CREATES} creates, {} answered \
         before the kill, 0 orphan sessions",
        replayed,
        created_before.iter().flatten().count()
    );
    w1.stop().await;
    w2.stop().await;
    drop(coord);
}

#[tokio::test]
async fn sigterm_drains_calls_in_flight_before_closing_worker_streams() {
    let dir = crate::harness::tempdir();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coord = coordinator_process(
        port,
        &dir.path().join("coordinator"),
        &dir.path().join("c.log"),
    )
    .await;
    let w = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&url).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session");

    let mut c = client.clone();
    let id = session.id.clone();
    let in_flight = tokio::spawn(async move {
        c.call(&id, "echo", json!({"delay_ms": 1500, "payload": "drained"}))
            .await
    });
    wait_for("the slow call to be in flight on the worker", || {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.into_iter().find(|w| w.id == "w1")?;
            (w.in_flight_calls > 0).then_some(())
        }
    })
    .await;
    coord.sigterm();

    let resp = in_flight
        .await
        .expect("join")
        .expect("a call in flight at SIGTERM must complete");
    assert_eq!(structured(&resp)["payload"], json!("drained"));
    let exit = wait_for("coordinator exit", || {
        let st = coord.0.try_wait().ok().flatten();
        async move { st }
    })
    .await;
    assert!(exit.success(), "coordinator exited with {exit}");
    w.stop().await;
}

/// A worker as a child process (so it can be frozen with SIGSTOP and killed with SIGKILL).
fn spawn_worker_process(id: &str, coordinator: &str, base: &std::path::Path) -> ChildGuard {
    let port = free_port();
    let log = std::fs::File::create(base.join(format!("{id}.log"))).expect("log");
    let child = std::process::Command::new(sibling_binary("worker"))
        .env("GRPC_PORT", port.to_string())
        .env("HEIST_BIND_ADDR", "127.0.0.1")
        .env("WORKER_ID", id)
        .env("COORDINATOR_ADDR", coordinator)
        .env("BASE_WORKSPACE", base.join(id))
        .env("HEIST_JOIN_TOKEN", JOIN_TOKEN)
        .env("MAX_SESSIONS", "128")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn worker");
    ChildGuard(child)
}

fn signal(child: &ChildGuard, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig}");
}

#[tokio::test]
async fn a_frozen_worker_is_suspect_fails_calls_fast_and_gets_no_sessions() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    // Long lease: this test is about SUSPECT, not LOST.
    config.lease_ttl = std::time::Duration::from_secs(60);
    config.suspect_after = std::time::Duration::from_millis(600);
    config.worker_keepalive_interval = std::time::Duration::from_millis(300);
    config.worker_keepalive_timeout = std::time::Duration::from_millis(600);
    let coord = Coordinator::start(config).await;
    let frozen = spawn_worker_process("w-frozen", &coord.url(), dir.path());
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w-frozen"]).await;
    let held = client.create_session(&[]).await.expect("session");
    assert_eq!(held.worker_id, "w-frozen");
    let other = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w-ok")).await;
    client.wait_ready(&["w-ok"]).await;

    // A call in flight when the worker freezes ends UNAVAILABLE (its channel's keep-alive
    // ping goes unanswered), not at the caller's deadline.
    let mut c = client.clone();
    let id = held.id.clone();
    let in_flight =
        tokio::spawn(async move { c.call(&id, "echo", json!({"delay_ms": 30000})).await });
    wait_for("the slow call to be in flight on the worker", || {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.into_iter().find(|w| w.id == "w-frozen")?;
            (w.in_flight_calls > 0).then_some(())
        }
    })
    .await;
    signal(&frozen, "-STOP");
    client
        .wait_worker_state("w-frozen", v1::WorkerState::Suspect)
        .await;
    let err = in_flight
        .await
        .expect("join")
        .expect_err("frozen worker cannot answer");
    assert_status(
        &err,
        tonic::Code::Unavailable,
        heist_proto::errors::reason::WORKER_UNAVAILABLE,
    );
    // New calls fail at once with retry advice; new sessions land on the healthy worker.
    let err = client
        .call(&held.id, "echo", json!({}))
        .await
        .expect_err("suspect worker");
    assert_status(
        &err,
        tonic::Code::Unavailable,
        heist_proto::errors::reason::WORKER_UNAVAILABLE,
    );
    assert!(
        heist_proto::errors::retry_after_of(&err).is_some(),
        "UNAVAILABLE carries RetryInfo: {err:?}"
    );
    for _ in 0..3 {
        let s = client.create_session(&[]).await.expect("placed elsewhere");
        assert_eq!(s.worker_id, "w-ok");
    }

    // Thawed, it heartbeats again and is READY; its session works.
    signal(&frozen, "-CONT");
    client.wait_ready(&["w-frozen"]).await;
    let back = wait_for("the session's calls to route again", || {
        let mut c = client.clone();
        let id = held.id.clone();
        async move { c.call(&id, "echo", json!({"payload": "back"})).await.ok() }
    })
    .await;
    assert_eq!(structured(&back)["payload"], json!("back"));

    // A call in flight on a worker killed outright ends UNAVAILABLE, not UNKNOWN.
    let mut c = client.clone();
    let id = held.id.clone();
    let in_flight =
        tokio::spawn(async move { c.call(&id, "echo", json!({"delay_ms": 30000})).await });
    wait_for("the slow call to be in flight on the worker", || {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.into_iter().find(|w| w.id == "w-frozen")?;
            (w.in_flight_calls > 0).then_some(())
        }
    })
    .await;
    signal(&frozen, "-KILL");
    let err = in_flight.await.expect("join").expect_err("killed worker");
    assert_status(
        &err,
        tonic::Code::Unavailable,
        heist_proto::errors::reason::WORKER_UNAVAILABLE,
    );
    drop(frozen);
    other.stop().await;
    coord.stop().await;
}

/// Sessions on the worker that is lost in the failover test.
const FAILOVER_SESSIONS: usize = 100;

async fn create_labelled(c: &mut Client, labels: &[(&str, &str)]) -> v1::Session {
    c.create_session(labels).await.expect("create")
}

#[tokio::test]
async fn a_lost_workers_sessions_fail_over_from_their_checkpoints() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.lease_ttl = std::time::Duration::from_millis(1500);
    config.suspect_after = std::time::Duration::from_millis(600);
    let coord = Coordinator::start(config).await;
    let mut doomed = spawn_worker_process("w-doomed", &coord.url(), dir.path());
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w-doomed"]).await;
    let mut checkpoints =
        v1::checkpoint_service_client::CheckpointServiceClient::new(channel(&coord.url()).await);

    // Sessions with a checkpoint, then one more write each that the checkpoint does not hold.
    let mut recoverable = Vec::new();
    for i in 0..FAILOVER_SESSIONS {
        let s = create_labelled(&mut client, &[]).await;
        client
            .call(
                &s.id,
                "fs.write",
                json!({"path": "kept.txt", "content": format!("kept {i}")}),
            )
            .await
            .expect("write");
        let ckpt = checkpoints
            .create_checkpoint(authed(
                &client.token,
                v1::CreateCheckpointRequest {
                    session_id: s.id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("checkpoint")
            .into_inner();
        client
            .call(
                &s.id,
                "fs.write",
                json!({"path": "lost.txt", "content": "after"}),
            )
            .await
            .expect("write after the checkpoint");
        recoverable.push((s.id, ckpt.id, i));
    }
    let bare = create_labelled(&mut client, &[]).await;
    let manual = create_labelled(&mut client, &[("heist.failover", "manual")]).await;
    for s in [&bare, &manual] {
        assert_eq!(s.worker_id, "w-doomed");
    }
    let other = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("w-ok").capacity(FAILOVER_SESSIONS as u32 + 8),
    )
    .await;
    client.wait_ready(&["w-ok"]).await;

    doomed.0.kill().expect("SIGKILL");
    doomed.0.wait().expect("reap");
    client
        .wait_worker_state("w-doomed", v1::WorkerState::Lost)
        .await;
    let detected = std::time::Instant::now();
    let mut last_ready_at = detected;
    for (id, ckpt, i) in &recoverable {
        let s = wait_for("the session to fail over", || {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                let s = c.get_session(&id).await.ok()?;
                (s.state == v1::SessionState::Ready as i32 && s.worker_id == "w-ok").then_some(s)
            }
        })
        .await;
        last_ready_at = std::time::Instant::now();
        let from = s.recovered_from.expect("recovered_from");
        assert_eq!(&from.checkpoint_id, ckpt);
        assert_eq!(from.lost_worker_id, "w-doomed");
        assert_eq!(
            from.lost_calls, 1,
            "the write after the checkpoint is reported lost"
        );
        assert!(from.checkpoint_created_at.is_some() && from.recovered_at.is_some());
        let read = client
            .call(id, "fs.read", json!({"path": "kept.txt"}))
            .await
            .expect("read on the new worker");
        assert_eq!(text_of(&read), format!("kept {i}"));
        let gone = client
            .call(id, "fs.read", json!({"path": "lost.txt"}))
            .await;
        assert!(
            gone.is_err() || gone.as_ref().is_ok_and(|r| r.is_error),
            "the write after the checkpoint is not there: {gone:?}"
        );
    }
    let failover_ms = last_ready_at.duration_since(detected).as_millis();

    let b = client.get_session(&bare.id).await.expect("bare");
    assert_eq!(b.state, v1::SessionState::Failed as i32, "{b:?}");
    assert!(
        b.failure_reason.contains("no checkpoint"),
        "{}",
        b.failure_reason
    );
    let m = client.get_session(&manual.id).await.expect("manual");
    assert_eq!(
        m.worker_id, "w-doomed",
        "manual failover leaves the session where it was"
    );
    assert!(!m.worker_connected);
    println!(
        "failover: {FAILOVER_SESSIONS} sessions usable on another worker {failover_ms} ms after \
         the loss was seen (lease 1.5 s)"
    );
    other.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn closed_sessions_are_collected_after_the_retention() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.session_retention = std::time::Duration::ZERO;
    config.session_gc_interval = std::time::Duration::from_millis(100);
    let coord = Coordinator::start(config).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1").capacity(64)).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let open = client.create_session(&[]).await.expect("open");
    let mut closed = Vec::new();
    for _ in 0..50 {
        let s = client.create_session(&[]).await.expect("create");
        client.close_session(&s.id).await.expect("close");
        closed.push(s.id);
    }
    for id in &closed {
        wait_for("the closed session to be collected", || {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                match c.get_session(&id).await {
                    Err(e) if e.code() == tonic::Code::NotFound => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    }
    let all = client
        .sessions
        .list_sessions(authed(
            &client.token,
            v1::ListSessionsRequest {
                include_closed: true,
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner()
        .sessions;
    let ids: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [open.id.as_str()], "only the open session is left");
    w.stop().await;
    coord.stop().await;
}
