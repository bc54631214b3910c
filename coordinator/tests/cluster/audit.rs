//! The audit log of executed work: routed tool calls (unary and streamed) with the argument
//! digest, outcome and duration but never the arguments; checkpoint create, restore and fork;
//! the chain under concurrent calls; and the signed head catching records removed from the end
//! of a stopped coordinator's store.

use heist_proto::v1::{
    self, audit_service_client::AuditServiceClient,
    checkpoint_service_client::CheckpointServiceClient,
};
use prost::Message as _;
use serde_json::json;

use crate::harness::*;

/// Every audit record of `kind` (exact, or a prefix ending in a dot), in order.
async fn audit_of(url: &str, token: &str, kind: &str) -> Vec<v1::AuditEntry> {
    let mut client = AuditServiceClient::new(channel(url).await);
    let mut out = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = client
            .list_audit(authed(
                token,
                v1::ListAuditRequest {
                    after_seq,
                    limit: 1000,
                    filter: Some(v1::AuditFilter {
                        kind: kind.to_owned(),
                        subject: String::new(),
                    }),
                },
            ))
            .await
            .expect("list audit")
            .into_inner();
        out.extend(page.entries);
        if page.next_after_seq == 0 {
            return out;
        }
        after_seq = page.next_after_seq;
    }
}

/// The `key=value` of a record's detail.
fn field<'a>(detail: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    detail
        .split(' ')
        .find_map(|part| part.strip_prefix(prefix.as_str()))
}

/// What a record must name for arguments `args`: BLAKE3 of their canonical protobuf encoding.
fn digest_of(args: &serde_json::Value) -> String {
    let encoded = heist_proto::json::json_to_struct(args)
        .expect("object")
        .encode_to_vec();
    format!("blake3:{}", blake3::hash(&encoded).to_hex())
}

async fn verify(url: &str, token: &str) -> v1::VerifyAuditResponse {
    AuditServiceClient::new(channel(url).await)
        .verify_audit(authed(token, v1::VerifyAuditRequest {}))
        .await
        .expect("verify")
        .into_inner()
}

#[tokio::test]
async fn executed_calls_are_recorded_with_digest_outcome_and_duration_but_not_their_arguments() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session").id;

    let write = json!({"path": "vault/combination.txt", "content": "4-8-15-16-23-42"});
    let written = client
        .call_with_id(&session, "fs.write", write.clone(), "write-1")
        .await
        .expect("write");
    assert!(!written.is_error, "{written:?}");
    // A retry with the same request id is answered from the record: not executed again.
    let replay = client
        .call_with_id(&session, "fs.write", write.clone(), "write-1")
        .await
        .expect("replay");
    assert!(replay.replayed);
    let missing = json!({"path": "vault/nothing-here.txt"});
    let failed = client
        .call(&session, "fs.read", missing.clone())
        .await
        .expect("read");
    assert!(failed.is_error, "{failed:?}");
    let echo = json!({"text": "streamed-secret-text"});
    let mut events = client
        .tools
        .call_tool_stream(authed(
            &client.token,
            v1::CallToolRequest {
                session_id: session.clone(),
                tool: "echo".into(),
                arguments: heist_proto::json::json_to_struct(&echo),
                request_id: String::new(),
            },
        ))
        .await
        .expect("stream")
        .into_inner();
    while events.message().await.expect("event").is_some() {}

    let records = audit_of(&coord.url(), &client.token, "tool.executed").await;
    let summary: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                field(&r.detail, "tool").unwrap_or(""),
                field(&r.detail, "outcome").unwrap_or(""),
                field(&r.detail, "via").unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("fs.write", "ok", "call"),
            ("fs.read", "tool_error", "call"),
            ("echo", "ok", "stream"),
        ],
        "{records:#?}"
    );
    for (record, args) in records.iter().zip([&write, &missing, &echo]) {
        assert_eq!(record.subject, ADMIN_ID);
        assert_eq!(field(&record.detail, "session"), Some(session.as_str()));
        assert_eq!(
            field(&record.detail, "args").map(str::to_owned),
            Some(digest_of(args))
        );
        let took: f64 = field(&record.detail, "duration_ms")
            .expect("duration")
            .parse()
            .expect("a number of milliseconds");
        assert!(took > 0.0, "{}", record.detail);
        for secret in ["combination", "4-8-15", "nothing-here", "streamed-secret"] {
            assert!(!record.detail.contains(secret), "{}", record.detail);
        }
    }
    assert!(verify(&coord.url(), &client.token).await.intact);
    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn with_audit_calls_mutating_only_calls_of_mutating_tools_are_recorded() {
    let dir = crate::harness::tempdir();
    let mut config = coordinator_config(&dir.path().join("c"));
    config.audit_calls = heist_coordinator::audit::AuditCalls::Mutating;
    let coord = Coordinator::start(config).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session").id;
    client
        .call(&session, "echo", json!({"text": "hi"}))
        .await
        .expect("echo");
    client
        .call(
            &session,
            "fs.write",
            json!({"path": "a.txt", "content": "x"}),
        )
        .await
        .expect("write");
    let tools: Vec<String> = audit_of(&coord.url(), &client.token, "tool.executed")
        .await
        .iter()
        .filter_map(|r| field(&r.detail, "tool").map(str::to_owned))
        .collect();
    assert_eq!(tools, ["fs.write"]);
    w.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn checkpoint_create_restore_and_fork_are_recorded() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session").id;
    client
        .call(
            &session,
            "fs.write",
            json!({"path": "plan.txt", "content": "v1"}),
        )
        .await
        .expect("write");
    let mut checkpoints = CheckpointServiceClient::new(channel(&coord.url()).await);
    let checkpoint = checkpoints
        .create_checkpoint(authed(
            &client.token,
            v1::CreateCheckpointRequest {
                session_id: session.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("checkpoint")
        .into_inner();
    checkpoints
        .restore_checkpoint(authed(
            &client.token,
            v1::RestoreCheckpointRequest {
                checkpoint_id: checkpoint.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("restore");
    let fork = checkpoints
        .fork_session(authed(
            &client.token,
            v1::ForkSessionRequest {
                checkpoint_id: checkpoint.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("fork")
        .into_inner();

    let records = audit_of(&coord.url(), &client.token, "checkpoint.").await;
    let seen: Vec<(&str, &str, Option<&str>, Option<&str>)> = records
        .iter()
        .map(|r| {
            (
                r.kind.as_str(),
                r.subject.as_str(),
                field(&r.detail, "checkpoint"),
                field(&r.detail, "session"),
            )
        })
        .collect();
    let id = Some(checkpoint.id.as_str());
    assert_eq!(
        seen,
        [
            ("checkpoint.created", ADMIN_ID, id, Some(session.as_str())),
            ("checkpoint.restored", ADMIN_ID, id, Some(session.as_str())),
            ("checkpoint.forked", ADMIN_ID, id, Some(fork.id.as_str())),
        ]
    );
    w.stop().await;
    coord.stop().await;
}

/// (Two runtime threads: the calls run concurrently against the in-process coordinator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_keep_one_valid_chain() {
    const TASKS: usize = 8;
    const CALLS: usize = 25;
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session").id;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let mut client = Client::with_token(&coord.url(), client.token.clone()).await;
        let session = session.clone();
        tasks.spawn(async move {
            for i in 0..CALLS {
                let text = format!("{task}-{i}");
                client
                    .call(&session, "echo", json!({ "text": text }))
                    .await
                    .expect("echo");
            }
        });
    }
    // Other records interleave with the calls'.
    for _ in 0..5 {
        issue_token(&coord.url(), ADMIN_ID, ADMIN_SECRET)
            .await
            .expect("token");
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    let records = audit_of(&coord.url(), &client.token, "").await;
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
    let executed = records.iter().filter(|r| r.kind == "tool.executed").count();
    assert_eq!(executed, TASKS * CALLS);
    let verdict = verify(&coord.url(), &client.token).await;
    assert!(verdict.intact, "{verdict:?}");
    assert_eq!(verdict.records, records.len() as u64);
    w.stop().await;
    coord.stop().await;
}

/// (Two runtime threads: the coordinator runs in this process and serves the heistctl the test
/// waits on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_removed_from_the_end_of_a_stopped_store_are_reported_after_restart() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("c");
    let coord = Coordinator::start(coordinator_config(&data)).await;
    for _ in 0..4 {
        issue_token(&coord.url(), ADMIN_ID, ADMIN_SECRET)
            .await
            .expect("token");
    }
    coord.stop().await;

    // Someone with write access to the data directory removes the two newest records; what
    // is left is a valid, shorter chain.
    let store = crate::harness::open_stopped_store(&data).await;
    let tree = store.open_tree("audit").expect("tree");
    let last = heist_coordinator::audit::verify(&tree).expect("intact before");
    assert!(last >= 4, "{last}");
    for _ in 0..2 {
        let (key, value) = tree.last().expect("read").expect("a record");
        let mut batch = heist_coordinator::audit::decode_value(&value).expect("decode");
        batch.pop();
        if batch.is_empty() {
            tree.remove(key).expect("remove");
        } else {
            tree.insert(key, heist_coordinator::audit::encode_batch(batch))
                .expect("rewrite");
        }
    }
    assert_eq!(heist_coordinator::audit::verify(&tree), Ok(last - 2));
    drop(tree);
    drop(store);

    let coord = Coordinator::start(coordinator_config(&data)).await;
    let token = issue_token(&coord.url(), ADMIN_ID, ADMIN_SECRET)
        .await
        .expect("token");
    let out = heistctl(dir.path(), &coord.url(), &token, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("BROKEN at record {}", last - 1)),
        "{said}"
    );
    assert!(said.contains("truncated"), "{said}");
    assert!(
        said.contains(&format!("records {} to {last}", last - 1)),
        "names the records expected: {said}"
    );
    coord.stop().await;
}

#[tokio::test]
async fn agent_tool_calls_in_a_turn_are_recorded_from_its_events() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session").id;
    client
        .call(
            &session,
            "fs.write",
            json!({"path": "ledger.txt", "content": "vault code 4711\n"}),
        )
        .await
        .expect("write");
    let mut turn = v1::agent_service_client::AgentServiceClient::new(channel(&coord.url()).await)
        .run_turn(authed(
            &client.token,
            v1::RunTurnRequest {
                session_id: session.clone(),
                agent: "assistant".into(),
                message: "Read ledger.txt and compute 17 * 3".into(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("run")
        .into_inner();
    // (tool, arguments as requested) of each call that finished, in order.
    let mut requested = std::collections::HashMap::new();
    let mut calls = Vec::new();
    let mut turn_id = String::new();
    while let Some(event) = turn.message().await.expect("event") {
        turn_id = event.turn_id.clone();
        match event.event {
            Some(v1::turn_event::Event::ToolCallRequested(call)) => {
                requested.insert(call.call_id, call.arguments.unwrap_or_default());
            }
            Some(v1::turn_event::Event::ToolCallFinished(call)) => {
                let args = requested.remove(&call.call_id).expect("requested first");
                calls.push((call.tool, args));
            }
            _ => {}
        }
    }
    assert_eq!(calls.len(), 2, "{calls:?}");

    let records: Vec<v1::AuditEntry> = audit_of(&coord.url(), &client.token, "tool.executed")
        .await
        .into_iter()
        .filter(|r| field(&r.detail, "via") == Some("turn"))
        .collect();
    assert_eq!(records.len(), calls.len(), "{records:#?}");
    for (record, (tool, args)) in records.iter().zip(&calls) {
        assert!(!args.fields.is_empty(), "{calls:?}");
        let digest = format!("blake3:{}", blake3::hash(&args.encode_to_vec()).to_hex());
        assert_eq!(record.subject, ADMIN_ID);
        assert_eq!(field(&record.detail, "tool"), Some(tool.as_str()));
        assert_eq!(field(&record.detail, "session"), Some(session.as_str()));
        assert_eq!(field(&record.detail, "turn"), Some(turn_id.as_str()));
        assert_eq!(field(&record.detail, "args"), Some(digest.as_str()));
        assert_eq!(field(&record.detail, "outcome"), Some("ok"));
        assert!(field(&record.detail, "duration_ms").is_some());
        assert!(
            !record.detail.contains("ledger") && !record.detail.contains("17 * 3"),
            "{}",
            record.detail
        );
    }
    w.stop().await;
    coord.stop().await;
}
