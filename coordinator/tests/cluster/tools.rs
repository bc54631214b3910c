//! Tool calls routed through the coordinator to the session's worker.

use heist_proto::{errors::reason, v1};
use serde_json::json;
use tonic::Code;

use crate::harness::*;

struct Setup {
    _dir: crate::harness::Scratch,
    coord: Coordinator,
    workers: Vec<Worker>,
    client: Client,
}

async fn setup() -> Setup {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let w1 = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let w2 = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w2")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1", "w2"]).await;
    Setup {
        _dir: dir,
        coord,
        workers: vec![w1, w2],
        client,
    }
}

impl Setup {
    fn worker(&self, id: &str) -> &Worker {
        self.workers.iter().find(|w| w.id == id).expect("worker")
    }

    async fn stop(self) {
        for w in self.workers {
            w.stop().await;
        }
        self.coord.stop().await;
    }
}

#[tokio::test]
async fn every_tool_is_routed_to_the_sessions_worker() {
    let mut s = setup().await;
    let tools = s
        .client
        .tools
        .list_tools(authed(&s.client.token, v1::ListToolsRequest::default()))
        .await
        .expect("list tools")
        .into_inner()
        .tools;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "calc",
            "db.query",
            "echo",
            "exec",
            "fs.delete",
            "fs.list",
            "fs.read",
            "fs.stat",
            "fs.write",
            "memory.recall",
            "memory.store",
            "run.python"
        ]
    );
    for t in &tools {
        assert!(!t.description.is_empty(), "{} has no description", t.name);
        let schema = heist_proto::json::struct_to_json(t.input_schema.as_ref().expect("schema"));
        assert_eq!(schema["type"], "object", "{}", t.name);
    }

    // One session on each worker; every tool answers from the right one.
    let a = s.client.create_session(&[]).await.expect("a");
    let b = s.client.create_session(&[]).await.expect("b");
    assert_ne!(a.worker_id, b.worker_id);
    for session in [&a, &b] {
        let c = &mut s.client;
        let echo = c
            .call(&session.id, "echo", json!({"msg": "hi", "n": [1, 2]}))
            .await
            .expect("echo");
        assert_eq!(echo.worker_id, session.worker_id);
        assert!(!echo.is_error);
        assert_eq!(structured(&echo), json!({"msg": "hi", "n": [1, 2]}));

        let calc = c
            .call(
                &session.id,
                "calc",
                json!({"expression": "2*(3+x)^2", "variables": {"x": 4}}),
            )
            .await
            .expect("calc");
        assert_eq!(calc.worker_id, session.worker_id);
        assert_eq!(structured(&calc)["result"], json!(98));

        let wrote = c
            .call(
                &session.id,
                "fs.write",
                json!({"path": "notes/plan.txt", "content": "vault at 3am"}),
            )
            .await
            .expect("write");
        assert!(!wrote.is_error, "{}", text_of(&wrote));
        let on_disk = s
            .worker(&session.worker_id)
            .workspace(&session.id)
            .join("notes/plan.txt");
        let c = &mut s.client;
        assert_eq!(
            std::fs::read_to_string(on_disk).expect("file on the worker"),
            "vault at 3am"
        );

        c.call(
            &session.id,
            "fs.write",
            json!({"path": "notes/plan.txt", "content": "\nbring drill", "append": true}),
        )
        .await
        .expect("append");
        let read = c
            .call(&session.id, "fs.read", json!({"path": "notes/plan.txt"}))
            .await
            .expect("read");
        assert_eq!(read.worker_id, session.worker_id);
        assert_eq!(text_of(&read), "vault at 3am\nbring drill");

        let stat = c
            .call(&session.id, "fs.stat", json!({"path": "notes/plan.txt"}))
            .await
            .expect("stat");
        assert_eq!(structured(&stat)["size"], json!(24));
        assert_eq!(structured(&stat)["type"], json!("file"));

        let list = c
            .call(
                &session.id,
                "fs.list",
                json!({"path": ".", "recursive": true}),
            )
            .await
            .expect("list");
        let listed = structured(&list).to_string();
        assert!(listed.contains("notes/plan.txt"), "{listed}");

        let del = c
            .call(
                &session.id,
                "fs.delete",
                json!({"path": "notes", "recursive": true}),
            )
            .await
            .expect("delete");
        assert!(!del.is_error, "{}", text_of(&del));
        let gone = c
            .call(&session.id, "fs.stat", json!({"path": "notes"}))
            .await
            .expect("stat gone");
        assert!(gone.is_error, "stat of a deleted path must be a tool error");
    }

    // A tool failure is a result with is_error, not a transport error.
    let div = s
        .client
        .call(&a.id, "calc", json!({"expression": "1/0"}))
        .await
        .expect("calc");
    assert!(div.is_error);
    assert!(
        text_of(&div).to_lowercase().contains("division by zero"),
        "{}",
        text_of(&div)
    );
    s.stop().await;
}

#[tokio::test]
async fn arguments_that_violate_the_schema_are_invalid_and_name_the_field() {
    let mut s = setup().await;
    let sess = s.client.create_session(&[]).await.expect("session");
    let c = &mut s.client;

    let err = c
        .call(&sess.id, "calc", json!({"expression": 5}))
        .await
        .expect_err("type");
    assert_status(&err, Code::InvalidArgument, reason::SCHEMA_VIOLATION);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "field").as_deref(),
        Some("expression")
    );
    assert!(err.message().contains("expression"), "{}", err.message());

    let err = c
        .call(&sess.id, "fs.read", json!({}))
        .await
        .expect_err("required");
    assert_status(&err, Code::InvalidArgument, reason::SCHEMA_VIOLATION);
    assert!(err.message().contains("path"), "{}", err.message());

    let err = c
        .call(
            &sess.id,
            "calc",
            json!({"expression": "x", "variables": {"x": "seven"}}),
        )
        .await
        .expect_err("nested");
    assert_status(&err, Code::InvalidArgument, reason::SCHEMA_VIOLATION);
    assert!(
        heist_proto::errors::metadata_of(&err, "field")
            .unwrap_or_default()
            .contains('x'),
        "{err:?}"
    );

    let err = c
        .call(&sess.id, "no.such.tool", json!({}))
        .await
        .expect_err("unknown tool");
    assert_status(&err, Code::NotFound, reason::TOOL_NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn paths_that_leave_the_workspace_are_refused() {
    let mut s = setup().await;
    let sess = s.client.create_session(&[]).await.expect("session");
    let ws = s.worker(&sess.worker_id).workspace(&sess.id);
    // Planted by something with access to the worker's disk: links pointing out of the workspace.
    std::os::unix::fs::symlink("/", ws.join("root")).expect("symlink to /");
    std::os::unix::fs::symlink("../..", ws.join("up")).expect("symlink up");
    std::fs::create_dir(ws.join("inside")).expect("dir");
    std::os::unix::fs::symlink("inside", ws.join("alias")).expect("symlink inside");

    let c = &mut s.client;
    for path in [
        "/etc/passwd",
        "../../../../etc/passwd",
        "a/../../etc/passwd",
        "root/etc/passwd",
        "up/c/db",
        "nul\u{0}byte",
    ] {
        for (tool, args) in [
            ("fs.read", json!({"path": path})),
            ("fs.write", json!({"path": path, "content": "pwned"})),
            ("fs.stat", json!({"path": path})),
            ("fs.list", json!({"path": path})),
            ("fs.delete", json!({"path": path})),
        ] {
            let err = c.call(&sess.id, tool, args).await.expect_err(path);
            assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);
        }
    }
    // A link that stays inside works.
    c.call(
        &sess.id,
        "fs.write",
        json!({"path": "alias/ok.txt", "content": "fine"}),
    )
    .await
    .expect("inside");
    assert_eq!(
        std::fs::read_to_string(ws.join("inside/ok.txt")).expect("file"),
        "fine"
    );
    // Nothing outside was touched, and the worker still serves.
    assert!(!std::path::Path::new("/etc/pwned").exists());
    c.call(&sess.id, "echo", json!({"still": "alive"}))
        .await
        .expect("healthy");
    s.stop().await;
}

#[tokio::test]
async fn a_retried_tool_call_with_the_same_request_id_runs_once() {
    let mut s = setup().await;
    let sess = s.client.create_session(&[]).await.expect("session");
    let c = &mut s.client;
    let args = json!({"path": "log.txt", "content": "line\n", "append": true});
    let first = c
        .call_with_id(&sess.id, "fs.write", args.clone(), "call-1")
        .await
        .expect("first");
    assert!(!first.replayed);
    let retry = c
        .call_with_id(&sess.id, "fs.write", args.clone(), "call-1")
        .await
        .expect("retry");
    assert!(retry.replayed, "the retry must be a replay");
    let read = c
        .call(&sess.id, "fs.read", json!({"path": "log.txt"}))
        .await
        .expect("read");
    assert_eq!(
        text_of(&read),
        "line\n",
        "the append must have applied once"
    );

    c.call_with_id(&sess.id, "fs.write", args.clone(), "call-2")
        .await
        .expect("new id");
    let read = c
        .call(&sess.id, "fs.read", json!({"path": "log.txt"}))
        .await
        .expect("read");
    assert_eq!(text_of(&read), "line\nline\n");

    let err = c
        .call_with_id(
            &sess.id,
            "fs.write",
            json!({"path": "other.txt", "content": "x"}),
            "call-1",
        )
        .await
        .expect_err("reused id");
    assert_status(&err, Code::InvalidArgument, reason::REQUEST_ID_REUSED);

    // Concurrent duplicates: one runs, the others replay it.
    let args = json!({"path": "race.txt", "content": "x", "append": true});
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = s.client.clone();
        let (id, args) = (sess.id.clone(), args.clone());
        calls.push(tokio::spawn(async move {
            c.call_with_id(&id, "fs.write", args, "race").await
        }));
    }
    for call in calls {
        call.await.expect("join").expect("duplicate call");
    }
    let read = s
        .client
        .call(&sess.id, "fs.read", json!({"path": "race.txt"}))
        .await
        .expect("read");
    assert_eq!(text_of(&read), "x");
    s.stop().await;
}
