//! Sandboxed commands through the coordinator and the real worker (with the real
//! `heist-sandbox` helper): exec and run.python results, live output, timeouts, cancellation,
//! quotas, and hostile commands. Every hostile case checks that the worker stays healthy and
//! that another session is untouched.

use std::{path::Path, time::Duration};

use heist_proto::{errors::reason, v1};
use serde_json::{Value as Json, json};
use tonic::{Code, Streaming};

use crate::harness::*;

struct Lab {
    dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    client: Client,
}

async fn lab() -> Lab {
    lab_with(WorkerOpts::new("w1")).await
}

async fn lab_with(opts: WorkerOpts) -> Lab {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(&coord.url(), dir.path(), opts).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    // READY at the coordinator can come a moment before the worker has taken in Accepted (it
    // then refuses calls as not registered); the worker's own health says when it has.
    let url = worker.url();
    wait_for("the worker's health SERVING", || {
        let url = url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    Lab {
        dir,
        coord,
        worker,
        client,
    }
}

impl Lab {
    async fn session(&mut self) -> String {
        self.client.create_session(&[]).await.expect("session").id
    }

    /// A second session holding `keep.txt`; [`Lab::assert_healthy`] checks later that a
    /// hostile command in another session left it alone.
    async fn bystander(&mut self) -> String {
        let other = self.session().await;
        self.sh_ok(&other, "echo precious > keep.txt").await;
        other
    }

    async fn exec(
        &mut self,
        session: &str,
        args: Json,
    ) -> Result<v1::CallToolResponse, tonic::Status> {
        self.client.call(session, "exec", args).await
    }

    /// Runs a shell command that must work, returning its stdout.
    async fn sh_ok(&mut self, session: &str, script: &str) -> String {
        let resp = self.exec(session, sh(script)).await.expect("exec");
        assert!(!resp.is_error, "{script}: {}", structured(&resp));
        stdout(&resp)
    }

    async fn stream(
        &mut self,
        session: &str,
        tool: &str,
        args: Json,
        timeout: Option<Duration>,
    ) -> Result<Streaming<v1::ToolEvent>, tonic::Status> {
        self.stream_with_id(session, tool, args, timeout, "").await
    }

    async fn stream_with_id(
        &mut self,
        session: &str,
        tool: &str,
        args: Json,
        timeout: Option<Duration>,
        request_id: &str,
    ) -> Result<Streaming<v1::ToolEvent>, tonic::Status> {
        let arguments = heist_proto::json::json_to_struct(&args).expect("object");
        let mut request = authed(
            &self.client.token,
            v1::CallToolRequest {
                session_id: session.into(),
                tool: tool.into(),
                arguments: Some(arguments),
                request_id: request_id.into(),
            },
        );
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        self.client
            .tools
            .call_tool_stream(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// The worker answers and another session's commands still work.
    async fn assert_healthy(&mut self, other: &str) {
        assert!(
            health_serving(&self.worker.url()).await,
            "worker not serving"
        );
        assert_eq!(self.sh_ok(other, "cat keep.txt").await, "precious\n");
    }

    async fn stop(self) {
        self.worker.stop().await;
        self.coord.stop().await;
    }
}

fn sh(script: &str) -> Json {
    json!({"command": script})
}

fn stdout(resp: &v1::CallToolResponse) -> String {
    structured(resp)["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn stderr(resp: &v1::CallToolResponse) -> String {
    structured(resp)["stderr"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

async fn wait_gone(marker: &str) {
    wait_for(&format!("no process with {marker}"), || async {
        processes_with(marker).is_empty().then_some(())
    })
    .await;
}

fn marker() -> String {
    format!("heist-test-{}", uuid::Uuid::new_v4().simple())
}

/// Reads a stream to its end: the output chunks (stream, bytes) and the final result.
async fn drain(
    mut events: Streaming<v1::ToolEvent>,
) -> (
    Vec<(i32, Vec<u8>)>,
    Result<v1::CallToolResponse, tonic::Status>,
) {
    let mut chunks = Vec::new();
    loop {
        match events.message().await {
            Ok(Some(v1::ToolEvent {
                event: Some(v1::tool_event::Event::Output(chunk)),
            })) => chunks.push((chunk.stream, chunk.data)),
            Ok(Some(v1::ToolEvent {
                event: Some(v1::tool_event::Event::Result(resp)),
            })) => {
                assert!(
                    events.message().await.ok().flatten().is_none(),
                    "the result is the last event"
                );
                return (chunks, Ok(resp));
            }
            Ok(Some(other)) => panic!("unexpected event {other:?}"),
            Ok(None) => panic!("stream ended without a result"),
            Err(status) => return (chunks, Err(status)),
        }
    }
}

fn joined(chunks: &[(i32, Vec<u8>)], stream: v1::OutputStream) -> String {
    let bytes: Vec<u8> = chunks
        .iter()
        .filter(|(s, _)| *s == stream as i32)
        .flat_map(|(_, d)| d.clone())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn the_worker_reports_the_isolation_it_really_has() {
    let mut lab = lab().await;
    let workers = lab.client.workers().await;
    let w = &workers[0];
    assert_eq!(w.sandbox_backend, "process");
    for want in ["userns", "mountns", "pidns", "netns", "rlimits"] {
        assert!(
            w.isolation.iter().any(|f| f == want),
            "{want} in {:?}",
            w.isolation
        );
    }
    assert!(
        w.isolation.iter().any(|f| f.starts_with("landlock:v")),
        "{:?}",
        w.isolation
    );
    assert!(w.tools.iter().any(|t| t == "exec") && w.tools.iter().any(|t| t == "run.python"));
    lab.stop().await;
}

#[tokio::test]
async fn exec_returns_output_exit_codes_and_runs_in_the_workspace() {
    let mut lab = lab().await;
    let s = lab.session().await;

    let resp = lab
        .exec(&s, sh("echo out; echo err >&2; exit 3"))
        .await
        .expect("exec");
    assert!(resp.is_error, "a non-zero exit is a tool error");
    let st = structured(&resp);
    assert_eq!(st["exit_code"], json!(3));
    assert_eq!(st["signal"], Json::Null);
    assert_eq!(st["timed_out"], json!(false));
    assert_eq!(st["stdout"], json!("out\n"));
    assert_eq!(st["stderr"], json!("err\n"));
    assert_eq!(st["stdout_truncated"], json!(false));
    assert!(st["duration_ms"].is_u64());
    assert_eq!(text_of(&resp), "out\n");
    assert_eq!(resp.worker_id, "w1");

    // argv (no shell), cwd, env and stdin.
    lab.sh_ok(&s, "mkdir -p sub && echo hi > sub/f.txt").await;
    let resp = lab
        .exec(
            &s,
            json!({"argv": ["cat", "f.txt", "-"], "cwd": "sub", "stdin": "from stdin\n"}),
        )
        .await
        .expect("exec");
    assert!(!resp.is_error, "{}", structured(&resp));
    assert_eq!(stdout(&resp), "hi\nfrom stdin\n");
    let resp = lab
        .exec(
            &s,
            json!({"command": "echo $GREETING $HOME", "env": {"GREETING": "hello"}}),
        )
        .await
        .expect("exec");
    let home = lab.worker.workspace(&s);
    // The workspace is at /workspace inside; the host path is not shown.
    assert_eq!(stdout(&resp), "hello /workspace\n");
    assert_eq!(
        std::fs::read_to_string(home.join("sub/f.txt")).expect("file on the worker"),
        "hi\n"
    );

    // The worker's own environment does not leak in.
    let env = lab.sh_ok(&s, "env").await;
    assert!(!env.contains("HEIST_") && !env.contains("CARGO"), "{env}");

    // A program that does not exist is a tool error like in a shell.
    let resp = lab
        .exec(&s, json!({"argv": ["no-such-program-xyz"]}))
        .await
        .expect("exec");
    assert!(resp.is_error);
    assert_eq!(structured(&resp)["exit_code"], json!(127));
    assert!(
        stderr(&resp).contains("no-such-program-xyz"),
        "{}",
        stderr(&resp)
    );

    // Bad requests are refused before anything runs.
    let err = lab
        .exec(&s, json!({}))
        .await
        .expect_err("neither argv nor command");
    assert_status(&err, Code::InvalidArgument, reason::INVALID_FIELD);
    let err = lab
        .exec(&s, json!({"command": "true", "env": {"1BAD": "x"}}))
        .await
        .expect_err("bad env name");
    assert_status(&err, Code::InvalidArgument, reason::INVALID_FIELD);
    let err = lab
        .exec(&s, json!({"command": "true", "timeout_s": 100000}))
        .await
        .expect_err("timeout over the maximum");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    lab.stop().await;
}

#[tokio::test]
async fn run_python_runs_code_and_workspace_files() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let resp = lab
        .client
        .call(
            &s,
            "run.python",
            json!({"code": "import sys\nprint(sum(int(a) for a in sys.argv[1:]), sys.stdin.read())", "args": ["1", "2"], "stdin": "in"}),
        )
        .await
        .expect("run.python");
    assert!(!resp.is_error, "{}", structured(&resp));
    assert_eq!(stdout(&resp), "3 in\n");

    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "lib/helper.py", "content": "def answer():\n    return 42\n"}),
        )
        .await
        .expect("write module");
    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "main.py", "content": "import sys\nsys.path.insert(0, 'lib')\nimport helper\nprint(helper.answer())\nraise SystemExit(4)\n"}),
        )
        .await
        .expect("write script");
    let resp = lab
        .client
        .call(&s, "run.python", json!({"path": "main.py"}))
        .await
        .expect("run.python");
    assert_eq!(stdout(&resp), "42\n");
    assert_eq!(structured(&resp)["exit_code"], json!(4));
    assert!(resp.is_error);

    // Code can import the session's modules (the workspace is on PYTHONPATH).
    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "mod1.py", "content": "X = 'imported'\n"}),
        )
        .await
        .expect("write");
    let resp = lab
        .client
        .call(
            &s,
            "run.python",
            json!({"code": "import mod1; print(mod1.X)"}),
        )
        .await
        .expect("run.python");
    assert_eq!(stdout(&resp), "imported\n", "{}", stderr(&resp));

    let resp = lab
        .client
        .call(
            &s,
            "run.python",
            json!({"code": "open('/etc/shadow').read()"}),
        )
        .await
        .expect("run.python");
    assert!(resp.is_error);
    assert!(
        stderr(&resp).contains("FileNotFoundError"),
        "{}",
        stderr(&resp)
    );

    let err = lab
        .client
        .call(&s, "run.python", json!({"path": "../../etc/passwd"}))
        .await
        .expect_err("outside");
    assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);
    lab.stop().await;
}

#[tokio::test]
async fn streamed_output_arrives_while_the_command_runs() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let script = "echo ready; while [ ! -e go ]; do sleep 0.02; done; echo done; echo bye >&2";
    let mut events = lab
        .stream(&s, "exec", sh(script), None)
        .await
        .expect("stream");
    let first = events.message().await.expect("event").expect("not the end");
    match first.event {
        Some(v1::tool_event::Event::Output(chunk)) => {
            assert_eq!(chunk.stream, v1::OutputStream::Stdout as i32);
            assert_eq!(chunk.data, b"ready\n");
        }
        other => panic!("expected live output first, got {other:?}"),
    }
    // The command is still waiting for us: it can only finish after this write.
    lab.client
        .call(&s, "fs.write", json!({"path": "go", "content": ""}))
        .await
        .expect("write go");
    let (chunks, result) = drain(events).await;
    let resp = result.expect("result");
    assert!(!resp.is_error, "{}", structured(&resp));
    assert_eq!(joined(&chunks, v1::OutputStream::Stdout), "done\n");
    assert_eq!(joined(&chunks, v1::OutputStream::Stderr), "bye\n");
    assert_eq!(stdout(&resp), "ready\ndone\n");
    assert_eq!(resp.worker_id, "w1");

    // With a request id the command runs once; a retry replays the result (no live output).
    let args = sh("echo run >> runs.txt; cat runs.txt");
    let first = lab
        .stream_with_id(&s, "exec", args.clone(), None, "stream-once")
        .await
        .expect("stream");
    let (chunks, result) = drain(first).await;
    assert_eq!(joined(&chunks, v1::OutputStream::Stdout), "run\n");
    assert!(!result.expect("result").replayed);
    let again = lab
        .stream_with_id(&s, "exec", args, None, "stream-once")
        .await
        .expect("stream");
    let (chunks, result) = drain(again).await;
    let replayed = result.expect("replayed result");
    assert!(chunks.is_empty() && replayed.replayed);
    assert_eq!(stdout(&replayed), "run\n");
    assert_eq!(lab.sh_ok(&s, "cat runs.txt").await, "run\n", "ran once");

    // A tool without live output streams just its result.
    let events = lab
        .stream(&s, "calc", json!({"expression": "6*7"}), None)
        .await
        .expect("stream");
    let (chunks, result) = drain(events).await;
    assert!(chunks.is_empty());
    assert_eq!(structured(&result.expect("result"))["result"], json!(42));

    // Errors of the call itself end the stream with their status.
    let events = lab
        .stream(&s, "exec", json!({"command": "true", "cwd": "../.."}), None)
        .await;
    let status = match events {
        Err(status) => status,
        Ok(events) => drain(events).await.1.expect_err("refused"),
    };
    assert_status(
        &status,
        Code::InvalidArgument,
        reason::PATH_OUTSIDE_WORKSPACE,
    );
    lab.stop().await;
}

#[tokio::test]
async fn timeouts_kill_the_whole_process_group_even_when_sigterm_is_ignored() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    let mark = marker();
    let script = format!(
        ": {mark}; trap '' TERM; sh -c 'trap \"\" TERM; while :; do sleep 1; done; : {mark}' & while :; do sleep 1; done"
    );
    let resp = lab
        .exec(&s, json!({"command": script, "timeout_s": 1}))
        .await
        .expect("exec");
    let st = structured(&resp);
    assert!(resp.is_error);
    assert_eq!(st["timed_out"], json!(true), "{st}");
    assert_eq!(st["signal"], json!(9), "SIGKILL after the grace: {st}");
    wait_gone(&mark).await;

    let resp = lab
        .exec(
            &s,
            json!({"command": "while :; do :; done", "timeout_s": 1}),
        )
        .await
        .expect("an infinite loop");
    assert_eq!(structured(&resp)["timed_out"], json!(true));
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn cancelling_or_a_deadline_kills_the_command() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    let mark = marker();
    let mut events = lab
        .stream(
            &s,
            "exec",
            sh(&format!("echo started; sleep 3600; : {mark}")),
            None,
        )
        .await
        .expect("stream");
    let first = events.message().await.expect("event");
    assert!(first.is_some(), "output before the cancel");
    assert!(!processes_with(&mark).is_empty(), "the command runs");
    drop(events);
    wait_gone(&mark).await;

    let mark = marker();
    let events = lab
        .stream(
            &s,
            "exec",
            sh(&format!("sleep 3600; : {mark}")),
            Some(Duration::from_millis(1500)),
        )
        .await;
    let status = match events {
        Err(status) => status,
        Ok(events) => drain(events).await.1.expect_err("deadline"),
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    wait_gone(&mark).await;

    // The same through the unary call.
    let mark = marker();
    let mut tools = lab.client.tools.clone();
    let arguments =
        heist_proto::json::json_to_struct(&sh(&format!("sleep 3600; : {mark}"))).expect("object");
    let mut request = authed(
        &lab.client.token,
        v1::CallToolRequest {
            session_id: s.clone(),
            tool: "exec".into(),
            arguments: Some(arguments),
            request_id: String::new(),
        },
    );
    request.set_timeout(Duration::from_millis(1500));
    let status = tools.call_tool(request).await.expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    wait_gone(&mark).await;

    // Closing the session stops what runs in it.
    let mark = marker();
    let mut events = lab
        .stream(
            &s,
            "exec",
            sh(&format!("echo started; sleep 3600; : {mark}")),
            None,
        )
        .await
        .expect("stream");
    assert!(events.message().await.expect("event").is_some());
    lab.client.close_session(&s).await.expect("close");
    let (_, result) = drain(events).await;
    assert_eq!(result.expect_err("closed").code(), Code::NotFound);
    wait_gone(&mark).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn commands_cannot_read_or_write_outside_the_workspace() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    let other_file = lab.worker.workspace(&other).join("keep.txt");
    let ws = lab.worker.workspace(&s);

    // The host's /etc/passwd and /etc/shadow: the command has its own small /etc.
    let resp = lab.exec(&s, sh("cat /etc/passwd")).await.expect("exec");
    assert!(!stdout(&resp).contains("root:"), "{}", stdout(&resp));
    let resp = lab.exec(&s, sh("cat /etc/shadow")).await.expect("exec");
    assert!(resp.is_error);
    assert!(stderr(&resp).contains("No such file"), "{}", stderr(&resp));

    // ../../x and absolute paths.
    let escape = format!("/tmp/heist-escape-{}", uuid::Uuid::new_v4().simple());
    let resp = lab
        .exec(
            &s,
            sh(&format!(
                "echo pwned > ../../x; echo pwned > {escape}; cp /etc/shadow ."
            )),
        )
        .await
        .expect("exec");
    assert!(resp.is_error);
    assert!(!ws.join("../../x").exists(), "../../x was created");
    assert!(!Path::new(&escape).exists(), "{escape} was created");
    let err = lab
        .exec(&s, json!({"command": "true", "cwd": "../.."}))
        .await
        .expect_err("cwd outside");
    assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);
    let err = lab
        .exec(&s, json!({"command": "true", "cwd": "/etc"}))
        .await
        .expect_err("absolute cwd");
    assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);

    // Another session's workspace, by its absolute path.
    let resp = lab
        .exec(
            &s,
            sh(&format!(
                "cat {}; echo gotcha > {}",
                other_file.display(),
                other_file.display()
            )),
        )
        .await
        .expect("exec");
    assert!(resp.is_error);
    assert!(!stdout(&resp).contains("precious"));

    // A symlink to / and reading through it.
    let resp = lab
        .exec(&s, sh("ln -s / root && cat root/etc/shadow"))
        .await
        .expect("exec");
    assert!(resp.is_error);
    assert!(!stdout(&resp).contains("root:"));
    let err = lab
        .client
        .call(&s, "fs.read", json!({"path": "root/etc/passwd"}))
        .await
        .expect_err("fs.read through the symlink");
    assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);
    let err = lab
        .exec(&s, json!({"command": "true", "cwd": "root"}))
        .await
        .expect_err("cwd through the symlink");
    assert_status(&err, Code::InvalidArgument, reason::PATH_OUTSIDE_WORKSPACE);

    // A hard link to a file outside.
    let outside = lab.dir.path().join("outside-secret.txt");
    std::fs::write(&outside, "secret").expect("outside file");
    let resp = lab
        .exec(&s, sh(&format!("ln {} hl && cat hl", outside.display())))
        .await
        .expect("exec");
    assert!(resp.is_error);
    assert!(!stdout(&resp).contains("secret"));
    assert!(!ws.join("hl").exists(), "the hard link was created");
    assert_eq!(std::fs::read_to_string(&outside).expect("read"), "secret");

    assert_eq!(
        std::fs::read_to_string(&other_file).expect("read"),
        "precious\n"
    );
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn commands_cannot_reach_the_network() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let code = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('connected')\nexcept OSError as e:\n    print('refused', e)\n"
    );
    let resp = lab
        .client
        .call(&s, "run.python", json!({"code": code}))
        .await
        .expect("run.python");
    assert!(
        stdout(&resp).starts_with("refused"),
        "{}",
        structured(&resp)
    );
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the sandbox reached the test's listener: {other:?}"),
    }
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

fn few_processes(config: &mut heist_worker::Config) {
    config.quotas.processes = 32;
}

#[tokio::test]
async fn a_fork_bomb_is_contained_by_the_process_quota() {
    let mut lab = lab_with(WorkerOpts::new("w1").configure(few_processes)).await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    // Count how many processes one command gets: RLIMIT_NPROC holds in its user namespace.
    let code = "import os, sys, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork failed', e.errno, file=sys.stderr)\nprint(n)\n";
    let resp = lab
        .client
        .call(&s, "run.python", json!({"code": code}))
        .await
        .expect("run.python");
    let forked: u32 = stdout(&resp).trim().parse().expect("a count");
    assert!(forked <= 32, "{forked} processes despite a quota of 32");
    assert!(
        stderr(&resp).contains("fork failed 11"),
        "{}",
        stderr(&resp)
    );

    // The real thing: it runs until the timeout and leaves nothing behind.
    let mark = marker();
    let resp = lab
        .exec(
            &s,
            json!({"command": format!(": {mark}; f() {{ f | f & }}; f; sleep 60"), "timeout_s": 1}),
        )
        .await
        .expect("exec");
    assert!(resp.is_error);
    wait_gone(&mark).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

fn small_disk(config: &mut heist_worker::Config) {
    config.quotas.disk_bytes = 1 << 20;
    config.quotas.files = 50;
    config.quotas.cpu_seconds = 1;
    config.quota_poll_interval = Duration::from_millis(100);
}

#[tokio::test]
async fn quotas_stop_commands_and_writes_with_resource_exhausted() {
    let mut lab = lab_with(WorkerOpts::new("w1").configure(small_disk)).await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    // One big file: RLIMIT_FSIZE stops it at the quota.
    let err = lab
        .exec(&s, sh("head -c 5000000 /dev/zero > big"))
        .await
        .expect_err("over the disk quota");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("disk_bytes")
    );
    assert!(
        err.message().contains("HEIST_QUOTA_DISK_BYTES"),
        "{}",
        err.message()
    );
    // Over quota, nothing may grow: writes are refused, deleting works.
    let err = lab
        .client
        .call(
            &s,
            "fs.write",
            json!({"path": "more.txt", "content": "0123456789"}),
        )
        .await
        .expect_err("no room");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    let resp = lab.exec(&s, sh("echo x > small")).await.expect("exec");
    assert!(resp.is_error, "a command cannot grow the workspace either");
    lab.sh_ok(&s, "rm big small").await;
    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "more.txt", "content": "0123456789"}),
        )
        .await
        .expect("room again");

    // Many small files: measured while running and at the end.
    let err = lab
        .exec(
            &s,
            sh("for i in $(seq 1 40); do head -c 100000 /dev/zero > f$i; done"),
        )
        .await
        .expect_err("over the disk quota");
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("disk_bytes"),
        "{err:?}"
    );
    lab.sh_ok(&s, "rm -f f*").await;
    let err = lab
        .exec(&s, sh("for i in $(seq 1 60); do : > e$i; done"))
        .await
        .expect_err("over the file quota");
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("files"),
        "{err:?}"
    );
    lab.sh_ok(&s, "rm -f e*").await;

    // CPU seconds.
    let err = lab
        .exec(
            &s,
            json!({"command": "while :; do :; done", "timeout_s": 60}),
        )
        .await
        .expect_err("over the CPU quota");
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("cpu_seconds"),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read_to_string(lab.worker.workspace(&other).join("keep.txt")).expect("read"),
        "precious\n"
    );
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn huge_output_is_capped_and_huge_argv_refused() {
    let mut lab = lab().await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    let cap = heist_worker::quota::Quotas::default().output_bytes;

    let events = lab
        .stream(
            &s,
            "exec",
            sh("head -c 100000000 /dev/zero | tr '\\0' x; echo end >&2"),
            None,
        )
        .await
        .expect("stream");
    let (chunks, result) = drain(events).await;
    let resp = result.expect("result");
    assert!(!resp.is_error, "{}", structured(&resp)["stderr"]);
    let st = structured(&resp);
    assert_eq!(st["stdout_truncated"], json!(true));
    assert_eq!(st["stderr_truncated"], json!(false));
    assert_eq!(stdout(&resp).len() as u64, cap);
    let streamed: usize = chunks
        .iter()
        .filter(|(s, _)| *s == v1::OutputStream::Stdout as i32)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(streamed as u64, cap, "live output is capped too");
    assert_eq!(joined(&chunks, v1::OutputStream::Stderr), "end\n");

    let huge = "a".repeat(1 << 20);
    let err = lab
        .exec(&s, json!({"argv": ["echo", huge]}))
        .await
        .expect_err("huge argv");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("argv_bytes")
    );
    let mut many: Vec<String> = vec!["echo".into()];
    many.extend((0..40_000).map(|i| format!("arg{i}")));
    let err = lab
        .exec(&s, json!({"argv": many}))
        .await
        .expect_err("many arguments");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

fn unconfined(config: &mut heist_worker::Config) {
    config.sandbox = heist_worker::sandbox::Mode::Unconfined;
}

fn no_helper(config: &mut heist_worker::Config) {
    config.sandbox_helper = Some("/nonexistent/heist-sandbox".into());
}

#[tokio::test]
async fn a_missing_sandbox_refuses_commands_and_unconfined_is_explicit() {
    let mut lab = lab_with(WorkerOpts::new("w1").configure(no_helper)).await;
    let workers = lab.client.workers().await;
    assert_eq!(workers[0].sandbox_backend, "none");
    assert!(workers[0].isolation.is_empty());
    let s = lab.session().await;
    let err = lab.exec(&s, sh("true")).await.expect_err("no sandbox");
    assert_status(&err, Code::FailedPrecondition, reason::SANDBOX_UNAVAILABLE);
    assert!(
        err.message().contains("--sandbox unconfined"),
        "{}",
        err.message()
    );
    lab.stop().await;

    let mut lab = lab_with(WorkerOpts::new("w1").configure(unconfined)).await;
    let workers = lab.client.workers().await;
    assert_eq!(workers[0].sandbox_backend, "process");
    // Unconfined: no namespaces or Landlock, only the resource limits.
    assert_eq!(workers[0].isolation[0], "rlimits");
    assert!(
        workers[0].isolation[1..]
            .iter()
            .all(|i| i.starts_with("cgroup") || i.starts_with("disk-quota:")),
        "{:?}",
        workers[0].isolation
    );
    let s = lab.session().await;
    assert_eq!(lab.sh_ok(&s, "echo unconfined").await, "unconfined\n");
    lab.stop().await;
}
