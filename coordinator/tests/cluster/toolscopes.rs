//! The tool gate: per-category scopes (`tools:fs`, `tools:exec`, ...) and a session's tool
//! policy (`allowed_tools`), through gRPC's CallTool and ListTools, across a coordinator restart
//! and a fork; refusals land in the audit log.

use heist_proto::v1::{
    self, audit_service_client::AuditServiceClient,
    checkpoint_service_client::CheckpointServiceClient,
};
use serde_json::json;
use tonic::Code;

use crate::harness::*;

const FS_TOOLS: &[&str] = &["fs.delete", "fs.list", "fs.read", "fs.stat", "fs.write"];

/// A coordinator with one worker, and an admin client.
async fn cluster(dir: &std::path::Path) -> (Coordinator, Worker, Client) {
    let coordinator = Coordinator::start(coordinator_config(&dir.join("coordinator"))).await;
    let worker = Worker::start(&coordinator.url(), dir, WorkerOpts::new("w1")).await;
    let mut admin = Client::admin(&coordinator.url()).await;
    admin.wait_ready(&["w1"]).await;
    (coordinator, worker, admin)
}

/// The admin client's token narrowed to `scopes`.
async fn scoped(url: &str, scopes: &[&str]) -> Client {
    let mut auth = v1::auth_service_client::AuthServiceClient::new(channel(url).await);
    let token = auth
        .issue_token(v1::IssueTokenRequest {
            client_id: ADMIN_ID.to_owned(),
            client_secret: ADMIN_SECRET.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        })
        .await
        .expect("scoped token")
        .into_inner()
        .access_token;
    Client::with_token(url, token).await
}

/// The `tool.denied` audit records, as `subject detail`.
async fn denials(url: &str, admin: &Client) -> Vec<String> {
    let mut audit = AuditServiceClient::new(channel(url).await);
    let req = v1::ListAuditRequest {
        after_seq: 0,
        limit: 1000,
        filter: Some(v1::AuditFilter {
            kind: "tool.denied".to_owned(),
            ..Default::default()
        }),
    };
    audit
        .list_audit(authed(&admin.token, req))
        .await
        .expect("list audit")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| format!("{} {}", e.subject, e.detail))
        .collect()
}

#[tokio::test]
async fn a_token_with_only_tools_fs_works_with_files_and_nothing_else() {
    let dir = crate::harness::tempdir();
    let (coordinator, worker, admin) = cluster(dir.path()).await;
    let url = coordinator.url();
    let mut files = scoped(
        &url,
        &["sessions:read", "sessions:write", "tools:read", "tools:fs"],
    )
    .await;
    let session = files.create_session(&[]).await.expect("create").id;

    files
        .call(
            &session,
            "fs.write",
            json!({"path": "a.txt", "content": "hello"}),
        )
        .await
        .expect("fs.write with tools:fs");
    let read = files
        .call(&session, "fs.read", json!({"path": "a.txt"}))
        .await
        .expect("fs.read with tools:fs");
    assert_eq!(text_of(&read), "hello");

    let err = files
        .call(&session, "exec", json!({"command": "echo no"}))
        .await
        .expect_err("exec needs tools:exec");
    assert_status(&err, Code::PermissionDenied, "SCOPE_MISSING");
    assert!(
        err.message().contains("\"tools:exec\""),
        "{}",
        err.message()
    );
    assert!(err.message().contains("`exec`"), "{}", err.message());
    let err = files
        .call(&session, "run.python", json!({"code": "print(1)"}))
        .await
        .expect_err("run.python needs tools:exec");
    assert!(
        err.message().contains("\"tools:exec\""),
        "{}",
        err.message()
    );
    // A tool in no category needs tools:call.
    let err = files
        .call(&session, "echo", json!({"text": "hi"}))
        .await
        .expect_err("echo needs tools:call");
    assert_status(&err, Code::PermissionDenied, "SCOPE_MISSING");
    assert!(
        err.message().contains("\"tools:call\""),
        "{}",
        err.message()
    );

    assert_eq!(files.tool_names("").await.expect("list"), FS_TOOLS);
    assert_eq!(files.tool_names(&session).await.expect("list"), FS_TOOLS);

    // The refusals are audited: who, where, which tool, why.
    let denied = denials(&url, &admin).await;
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert_eq!(
        denied[0],
        format!("admin session={session} tool=exec reason=token lacks tools:exec")
    );

    // A token with no tool scope at all is stopped before the gate, and lists nothing.
    let mut reader = scoped(&url, &["sessions:read", "tools:read"]).await;
    let err = reader
        .call(&session, "fs.read", json!({"path": "a.txt"}))
        .await
        .expect_err("no tool scope");
    assert_status(&err, Code::PermissionDenied, "SCOPE_MISSING");
    assert!(reader.tool_names("").await.expect("list").is_empty());

    // tools:call still means every tool (tokens issued before the categories).
    let mut all = scoped(&url, &["sessions:read", "tools:read", "tools:call"]).await;
    let names = all.tool_names("").await.expect("list");
    assert!(names.len() > FS_TOOLS.len() + 3, "{names:?}");
    let echoed = all
        .call(&session, "exec", json!({"command": "echo yes"}))
        .await
        .expect("exec with tools:call");
    assert!(text_of(&echoed).contains("yes"), "{echoed:?}");

    worker.stop().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_session_allowing_only_fs_refuses_calc_even_for_admin() {
    let dir = crate::harness::tempdir();
    let (coordinator, worker, mut admin) = cluster(dir.path()).await;
    let session = admin
        .create_session_allowing(&[], &["fs.*"])
        .await
        .expect("create");
    assert_eq!(session.allowed_tools, vec!["fs.*"]);
    let shown = admin.get_session(&session.id).await.expect("get");
    assert_eq!(shown.allowed_tools, vec!["fs.*"]);

    admin
        .call(
            &session.id,
            "fs.write",
            json!({"path": "a", "content": "x"}),
        )
        .await
        .expect("fs.write is allowed");
    let err = admin
        .call(&session.id, "calc", json!({"expression": "1+1"}))
        .await
        .expect_err("calc is outside the policy");
    assert_status(&err, Code::PermissionDenied, "TOOL_NOT_ALLOWED");
    assert!(
        err.message()
            .contains(&format!("session {} allows only fs.*", session.id)),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("--allow-tool calc"),
        "{}",
        err.message()
    );
    assert_eq!(
        admin.tool_names(&session.id).await.expect("list"),
        FS_TOOLS,
        "ListTools in the session shows only what it allows"
    );
    // Without a session, the admin token still lists everything.
    assert!(admin.tool_names("").await.expect("list").len() > FS_TOOLS.len());
    let denied = denials(&coordinator.url(), &admin).await;
    assert_eq!(
        denied,
        vec![format!(
            "admin session={} tool=calc reason=session allows only fs.*",
            session.id
        )]
    );

    // Names and globs combine; the token still has to allow each tool.
    let both = admin
        .create_session_allowing(&[], &["fs.*", "calc", "fs.*"])
        .await
        .expect("create");
    assert_eq!(
        both.allowed_tools,
        vec!["fs.*", "calc"],
        "duplicates dropped"
    );
    admin
        .call(&both.id, "calc", json!({"expression": "1+1"}))
        .await
        .expect("calc is allowed");
    let mut files = scoped(
        &coordinator.url(),
        &["sessions:read", "sessions:write", "tools:read", "tools:fs"],
    )
    .await;
    let mine = files
        .create_session_allowing(&[], &["fs.read", "calc"])
        .await
        .expect("create");
    assert_eq!(files.tool_names(&mine.id).await.expect("list"), ["fs.read"]);
    let err = files
        .call(&mine.id, "calc", json!({"expression": "1+1"}))
        .await
        .expect_err("the token lacks tools:calc");
    assert_status(&err, Code::PermissionDenied, "SCOPE_MISSING");

    // Entries that name no tool are refused, saying what is valid.
    for bad in ["nope", "sql.*", "*", "fs*", "shell.*", "calc.*"] {
        let err = admin
            .create_session_allowing(&[], &[bad])
            .await
            .expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("fs.*"), "{}", err.message());
        assert!(err.message().contains("calc"), "{}", err.message());
    }

    worker.stop().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn the_session_policy_survives_a_restart_and_carries_into_a_fork() {
    let dir = crate::harness::tempdir();
    let data = dir.path().join("coordinator");
    let (coordinator, worker, mut admin) = cluster(dir.path()).await;
    let session = admin
        .create_session_allowing(&[], &["fs.*", "calc"])
        .await
        .expect("create");
    admin
        .call(
            &session.id,
            "fs.write",
            json!({"path": "plan.txt", "content": "v1"}),
        )
        .await
        .expect("write");
    let mut checkpoints = CheckpointServiceClient::new(channel(&coordinator.url()).await);
    let checkpoint = checkpoints
        .create_checkpoint(authed(
            &admin.token,
            v1::CreateCheckpointRequest {
                session_id: session.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("checkpoint")
        .into_inner();
    assert_eq!(checkpoint.allowed_tools, vec!["fs.*", "calc"]);

    let addr = coordinator.addr;
    coordinator.stop().await;
    let coordinator = Coordinator::start_on(&addr.to_string(), coordinator_config(&data)).await;
    let mut admin = Client::with_token(&coordinator.url(), admin.token.clone()).await;
    admin.wait_ready(&["w1"]).await;

    let after = admin.get_session(&session.id).await.expect("get");
    assert_eq!(after.allowed_tools, vec!["fs.*", "calc"]);
    let err = wait_for("the session's worker back", || {
        let mut c = admin.clone();
        let id = session.id.clone();
        async move {
            let r = c.call(&id, "exec", json!({"command": "true"})).await;
            match r {
                Err(e) if e.code() == Code::PermissionDenied => Some(e),
                _ => None,
            }
        }
    })
    .await;
    assert_status(&err, Code::PermissionDenied, "TOOL_NOT_ALLOWED");

    let mut checkpoints = CheckpointServiceClient::new(channel(&coordinator.url()).await);
    let fork = checkpoints
        .fork_session(authed(
            &admin.token,
            v1::ForkSessionRequest {
                checkpoint_id: checkpoint.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("fork")
        .into_inner();
    assert_eq!(fork.allowed_tools, vec!["fs.*", "calc"]);
    let read = admin
        .call(&fork.id, "fs.read", json!({"path": "plan.txt"}))
        .await
        .expect("read in the fork");
    assert_eq!(text_of(&read), "v1");
    let err = admin
        .call(&fork.id, "exec", json!({"command": "true"}))
        .await
        .expect_err("the fork is as narrow as its source");
    assert_status(&err, Code::PermissionDenied, "TOOL_NOT_ALLOWED");

    worker.stop().await;
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heistctl_creates_a_narrowed_session_and_shows_its_policy() {
    let dir = crate::harness::tempdir();
    let (coordinator, worker, admin) = cluster(dir.path()).await;
    let ctl = |args: &[&str]| heistctl(dir.path(), &coordinator.url(), &admin.token, args);
    let created = ctl(&[
        "-o",
        "json",
        "session",
        "create",
        "--allow-tool",
        "fs.*",
        "--allow-tool",
        "calc",
    ]);
    assert!(created.status.success(), "{created:?}");
    let session: serde_json::Value = serde_json::from_slice(&created.stdout).expect("json");
    assert_eq!(
        session["allowed_tools"],
        json!(["fs.*", "calc"]),
        "{session}"
    );
    let id = session["id"].as_str().expect("id");

    let shown = ctl(&["session", "show", id]);
    assert!(shown.status.success(), "{shown:?}");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("allowed_tools:") && l.contains("fs.*,calc")),
        "{text}"
    );

    let bad = ctl(&["session", "create", "--allow-tool", "shell.*"]);
    assert!(!bad.status.success(), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("fs.*") && stderr.contains("calc"),
        "{stderr}"
    );

    worker.stop().await;
    coordinator.stop().await;
}
