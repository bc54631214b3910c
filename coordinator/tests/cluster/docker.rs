//! The `docker` sandbox backend through the coordinator: a worker with `--sandbox docker`
//! advertises `sandbox=docker`, a session asking for that label lands on it, and its commands
//! run in a container of their own. The escape checks of `escape.rs` that apply to a container
//! are repeated here, checked from inside and from the host (the `docker` CLI).
//!
//! They run wherever a Docker daemon answers and the sandbox image (HEIST_SANDBOX_IMAGE,
//! default `heist-sandbox:latest`, `make docker-sandbox`) exists; elsewhere each test prints
//! SKIPPED loudly and passes, unless HEIST_REQUIRE_DOCKER=1 makes that a failure.

use std::process::Command;

use heist_proto::v1;
use serde_json::json;

use crate::harness::*;

/// The image the tests run sessions in.
fn image() -> String {
    std::env::var("HEIST_SANDBOX_IMAGE").unwrap_or_else(|_| "heist-sandbox:latest".to_owned())
}

/// Runs the docker CLI; its stdout when it succeeded.
fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the tests can run here; prints SKIPPED (or fails under HEIST_REQUIRE_DOCKER=1).
fn docker_ready(test: &str) -> bool {
    let why = if docker(&["info", "--format", "{{.ServerVersion}}"]).is_none() {
        Some("no Docker daemon answers".to_owned())
    } else if docker(&["image", "inspect", &image()]).is_none() {
        Some(format!(
            "the sandbox image {} is missing (make docker-sandbox)",
            image()
        ))
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("HEIST_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "{test}: {why}, and HEIST_REQUIRE_DOCKER=1"
            );
            eprintln!("!!!!!! SKIPPED {test}: {why}; nothing was tested !!!!!!");
            false
        }
    }
}

fn use_docker(config: &mut heist_worker::Config) {
    config.sandbox = heist_worker::sandbox::Mode::Docker;
    config.sandbox_image = image();
    // Small limits, so the exhaustion checks are quick.
    config.quotas.session_memory_bytes = 128 << 20;
    config.quotas.session_processes = 64;
    config.quotas.cpu_seconds = 2;
}

struct Lab {
    _dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    client: Client,
    session: String,
}

/// A coordinator, a process-sandbox worker `w0` and a docker worker `wd`; a session asking for
/// `sandbox=docker`, which must land on `wd`.
async fn lab() -> Lab {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("wd").configure(use_docker),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["wd"]).await;
    let workers = client.workers().await;
    let wd = workers.iter().find(|w| w.id == "wd").expect("wd");
    assert_eq!(
        wd.sandbox_backend, "docker",
        "isolation: {:?}",
        wd.isolation
    );
    assert_eq!(wd.labels.get("sandbox").map(String::as_str), Some("docker"));
    for layer in ["docker", "netns:none", "rootfs:read-only", "caps:none"] {
        assert!(
            wd.isolation.iter().any(|l| l == layer),
            "{:?}",
            wd.isolation
        );
    }
    let session = client
        .create_session(&[("sandbox", "docker")])
        .await
        .expect("session")
        .id;
    Lab {
        _dir: dir,
        coord,
        worker,
        client,
        session,
    }
}

impl Lab {
    async fn sh(&mut self, script: &str) -> v1::CallToolResponse {
        self.client
            .call(&self.session, "exec", json!({"command": script}))
            .await
            .expect("exec")
    }

    async fn sh_ok(&mut self, script: &str) -> String {
        let resp = self.sh(script).await;
        assert!(!resp.is_error, "{script}: {}", structured(&resp));
        out(&resp, "stdout")
    }

    async fn stop(self) {
        self.worker.stop().await;
        self.coord.stop().await;
    }
}

fn out(resp: &v1::CallToolResponse, stream: &str) -> String {
    structured(resp)[stream]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Python allocating without end is stopped at the container's memory limit and answered
/// as over `session_memory_bytes`.
async fn a_memory_hog_is_out_of_memory(client: &mut Client, session: &str) {
    let err = client
        .call(
            session,
            "run.python",
            json!({"code": "x = []\nwhile True:\n    x.append(bytearray(16 << 20))"}),
        )
        .await
        .expect_err("out of memory");
    assert_status(&err, tonic::Code::ResourceExhausted, "LIMIT_EXCEEDED");
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("session_memory_bytes"),
        "{err:?}"
    );
}

/// `sleep 30` with a 1 s timeout comes back timed out.
async fn a_timeout_stops_the_command(client: &mut Client, session: &str) {
    let slow = client
        .call(
            session,
            "exec",
            json!({"command": "sleep 30", "timeout_s": 1}),
        )
        .await
        .expect("exec");
    assert_eq!(
        structured(&slow)["timed_out"],
        true,
        "{}",
        structured(&slow)
    );
}

/// The ids of the containers labelled for `session`.
fn containers_of(session: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.heist.session={session}"),
    ])
    .unwrap_or_default()
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

#[tokio::test]
async fn docker_sessions_run_commands_and_python_in_their_own_container() {
    if !docker_ready("docker_sessions_run_commands_and_python_in_their_own_container") {
        return;
    }
    let mut lab = lab().await;
    let session = lab.client.get_session(&lab.session).await.expect("get");
    assert_eq!(session.worker_id, "wd");

    // Streamed output, through the same ToolEvent stream as the process backend.
    let mut tools = lab.client.tools.clone();
    let arguments = heist_proto::json::json_to_struct(
        &json!({"command": "echo one; echo two >&2; printf data > made.txt"}),
    )
    .expect("args");
    let mut events = tools
        .call_tool_stream(authed(
            &lab.client.token,
            v1::CallToolRequest {
                session_id: lab.session.clone(),
                tool: "exec".into(),
                arguments: Some(arguments),
                request_id: String::new(),
            },
        ))
        .await
        .expect("stream")
        .into_inner();
    let (mut live, mut result) = (Vec::new(), None);
    while let Some(event) = events.message().await.expect("event") {
        match event.event {
            Some(v1::tool_event::Event::Output(chunk)) => live.push((chunk.stream, chunk.data)),
            Some(v1::tool_event::Event::Result(r)) => result = Some(r),
            _ => {}
        }
    }
    let result = result.expect("a result");
    assert!(!result.is_error, "{}", structured(&result));
    assert!(
        live.contains(&(v1::OutputStream::Stdout as i32, b"one\n".to_vec())),
        "{live:?}"
    );
    assert!(
        live.contains(&(v1::OutputStream::Stderr as i32, b"two\n".to_vec())),
        "{live:?}"
    );

    // The file is in the workspace on the host, and the worker's tools see it.
    let host_file = lab.worker.workspace(&lab.session).join("made.txt");
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("host file"),
        "data"
    );
    let read = lab
        .client
        .call(&lab.session, "fs.read", json!({"path": "made.txt"}))
        .await
        .expect("fs.read");
    assert!(text_of(&read).contains("data"), "{}", text_of(&read));

    // run.python, with stdin and the workspace on its path; exit codes come through.
    let py = lab
        .client
        .call(
            &lab.session,
            "run.python",
            json!({"code": "import sys, os\nprint(open('made.txt').read(), sys.stdin.read(), os.getcwd())\nsys.exit(3)", "stdin": "in"}),
        )
        .await
        .expect("run.python");
    assert_eq!(
        out(&py, "stdout"),
        "data in /workspace\n",
        "{}",
        structured(&py)
    );
    assert_eq!(structured(&py)["exit_code"], 3);

    // A timeout stops the command.
    a_timeout_stops_the_command(&mut lab.client, &lab.session).await;
    assert_eq!(lab.sh_ok("echo still here").await, "still here\n");

    // A command that signals everything it may signal stops only the session's commands: the
    // container (its init and keeper run as another uid) keeps running, unrestarted.
    let started = |id: &str| docker(&["inspect", "-f", "{{.State.StartedAt}}", id]);
    let id = containers_of(&lab.session).pop().expect("container");
    let before = started(&id).expect("inspect");
    let killed = lab
        .sh_ok("sleep 60 & kill -KILL -1; wait $!; echo $?")
        .await;
    assert_eq!(killed, "137\n", "the shell's child survived kill -1");
    assert_eq!(lab.sh_ok("echo after kill").await, "after kill\n");
    assert_eq!(
        started(&id).expect("inspect"),
        before,
        "the container restarted"
    );

    // One container, gone when the session closes.
    assert_eq!(containers_of(&lab.session).len(), 1);
    lab.client.close_session(&lab.session).await.expect("close");
    assert!(
        containers_of(&lab.session).is_empty(),
        "the container outlived its session"
    );
    lab.stop().await;
}

#[tokio::test]
async fn docker_workspace_files_survive_a_checkpoint_and_restore() {
    if !docker_ready("docker_workspace_files_survive_a_checkpoint_and_restore") {
        return;
    }
    let mut lab = lab().await;
    lab.sh_ok("mkdir -p d && echo v1 > d/f.txt").await;
    let mut checkpoints = v1::checkpoint_service_client::CheckpointServiceClient::new(
        channel(&lab.coord.url()).await,
    );
    let cp = checkpoints
        .create_checkpoint(authed(
            &lab.client.token,
            v1::CreateCheckpointRequest {
                session_id: lab.session.clone(),
                labels: Default::default(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("checkpoint")
        .into_inner();
    lab.sh_ok("echo v2 > d/f.txt && touch extra").await;
    checkpoints
        .restore_checkpoint(authed(
            &lab.client.token,
            v1::RestoreCheckpointRequest {
                checkpoint_id: cp.id.clone(),
                session_id: lab.session.clone(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("restore");
    // The restored tree is a new directory: the command sees it (a new bind mount).
    assert_eq!(lab.sh_ok("cat d/f.txt; ls").await, "v1\nd\n");
    lab.sh_ok("echo v3 > d/f.txt").await;
    lab.stop().await;
}

#[tokio::test]
async fn docker_commands_cannot_escape_their_container() {
    if !docker_ready("docker_commands_cannot_escape_their_container") {
        return;
    }
    let mut lab = lab().await;
    // No capabilities, no_new_privs, not root.
    let status = lab.sh_ok("cat /proc/self/status; id -u").await;
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    assert_ne!(status.lines().last(), Some("0"), "runs as root: {status}");

    // Read-only root; /tmp and the workspace are writable.
    let resp = lab.sh("touch /usr/x || touch /etc/x || echo > /x").await;
    assert!(resp.is_error, "wrote to the root: {}", structured(&resp));
    lab.sh_ok("echo t > /tmp/t && echo w > w.txt").await;

    // No network: only loopback, no route out, no DNS.
    let net = lab
        .sh_ok("cat /proc/net/dev | tail -n +3 | cut -d: -f1")
        .await;
    assert_eq!(net.split_whitespace().collect::<Vec<_>>(), ["lo"], "{net}");
    let resp = lab
        .sh("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), 3)\"")
        .await;
    assert!(resp.is_error, "reached the network: {}", structured(&resp));

    // No host processes: the only other process is the container's init.
    let procs = lab.sh_ok("ls /proc | grep -E '^[0-9]+$' | wc -l").await;
    let n: u32 = procs.trim().parse().expect("count");
    assert!(n < 10, "sees {n} processes");
    let resp = lab
        .sh("ps -e -o comm | grep -E 'dockerd|containerd|cargo'")
        .await;
    assert!(
        resp.is_error,
        "sees host processes: {}",
        out(&resp, "stdout")
    );

    // No engine socket, no host data.
    let resp = lab
        .sh("ls -la /var/run/docker.sock /run/docker.sock /run/containerd 2>&1; test -e /var/run/docker.sock || test -e /run/docker.sock")
        .await;
    assert!(
        resp.is_error,
        "the engine socket is visible: {}",
        out(&resp, "stdout")
    );
    let resp = lab.sh("ls /workspace/..; cat /etc/shadow").await;
    assert!(resp.is_error, "read /etc/shadow: {}", out(&resp, "stdout"));
    lab.stop().await;
}

#[tokio::test]
async fn docker_limits_contain_fork_bombs_and_memory_hogs() {
    if !docker_ready("docker_limits_contain_fork_bombs_and_memory_hogs") {
        return;
    }
    let mut lab = lab().await;
    // A fork bomb hits the pids limit and is stopped at its timeout; the session recovers.
    let bomb = lab
        .client
        .call(
            &lab.session,
            "exec",
            json!({"command": "b() { b | b & }; b; sleep 5", "timeout_s": 3}),
        )
        .await
        .expect("exec");
    assert!(bomb.is_error, "{}", structured(&bomb));
    assert_eq!(lab.sh_ok("echo alive").await, "alive\n");

    // An allocation past the container's memory limit is killed and answered like the
    // process backend's out-of-memory.
    a_memory_hog_is_out_of_memory(&mut lab.client, &lab.session).await;
    assert_eq!(lab.sh_ok("echo alive").await, "alive\n");

    // A SIGKILL that is no OOM kill stays a kill: the OOM above was accounted once.
    let killed = lab.sh("kill -9 $$").await;
    assert!(killed.is_error, "{}", structured(&killed));
    assert_eq!(structured(&killed)["signal"].as_f64(), Some(9.0));

    // The container killed under the session (its cgroup counts from zero again): the next
    // command restarts it, and an OOM kill there is still answered as one.
    let label = format!("label=io.heist.session={}", lab.session);
    let id = docker(&["ps", "-q", "--filter", &label]).expect("docker ps");
    docker(&["kill", id.trim()]).expect("docker kill");
    assert_eq!(lab.sh_ok("echo alive").await, "alive\n");
    a_memory_hog_is_out_of_memory(&mut lab.client, &lab.session).await;

    // Past the CPU quota: SIGXCPU, answered like the process backend's.
    let err = lab
        .client
        .call(
            &lab.session,
            "exec",
            json!({"command": "while :; do :; done", "timeout_s": 60}),
        )
        .await
        .expect_err("over the CPU quota");
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("cpu_seconds"),
        "{err:?}"
    );
    lab.stop().await;
}

#[tokio::test]
async fn a_docker_worker_sweeps_its_stale_containers_at_start() {
    if !docker_ready("a_docker_worker_sweeps_its_stale_containers_at_start") {
        return;
    }
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    // What a crashed worker `ws` with this workspace directory would have left.
    let label = heist_worker::sandbox::cgroup_name("ws", &dir.path().join("ws"));
    let stale = docker(&[
        "create",
        "--label",
        &format!("io.heist.worker={label}"),
        "--label",
        "io.heist.session=old",
        &image(),
        "sleep",
        "infinity",
    ])
    .expect("docker create")
    .trim()
    .to_owned();
    // Someone else's container with the same image stays.
    let other = docker(&[
        "create",
        "--label",
        "io.heist.worker=someone-else",
        &image(),
    ])
    .expect("docker create")
    .trim()
    .to_owned();
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("ws").configure(use_docker),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["ws"]).await;
    let left = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("id={stale}"),
    ])
    .unwrap_or_default();
    assert!(
        left.trim().is_empty(),
        "the stale container {stale} is still there"
    );
    assert!(
        docker(&["inspect", &other]).is_some(),
        "removed a container that is not the worker's"
    );
    docker(&["rm", "-f", &other]);
    worker.stop().await;
    coord.stop().await;
}

fn unreachable_engine(config: &mut heist_worker::Config) {
    config.sandbox = heist_worker::sandbox::Mode::Docker;
    config.docker_host = Some("unix:///nonexistent/docker.sock".to_owned());
}

/// Needs no Docker: a worker whose engine does not answer says so and never runs commands
/// unconfined; sessions asking for `sandbox=docker` are not placed on it.
#[tokio::test]
async fn a_docker_worker_without_an_engine_refuses_commands_and_the_label() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("wn").configure(unreachable_engine),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["wn"]).await;
    let workers = client.workers().await;
    assert_eq!(workers[0].sandbox_backend, "none");
    assert!(
        !workers[0].labels.contains_key("sandbox"),
        "{:?}",
        workers[0].labels
    );
    let err = client
        .create_session(&[("sandbox", "docker")])
        .await
        .expect_err("no docker worker");
    assert_status(&err, tonic::Code::ResourceExhausted, "NO_MATCHING_WORKER");
    let session = client.create_session(&[]).await.expect("session").id;
    let err = client
        .call(&session, "exec", json!({"command": "true"}))
        .await
        .expect_err("refused");
    assert_status(&err, tonic::Code::FailedPrecondition, "SANDBOX_UNAVAILABLE");
    assert!(err.message().contains("docker"), "{}", err.message());
    worker.stop().await;
    coord.stop().await;
}

/// A docker worker whose engine is the gate's socket in its base directory's parent.
fn use_gate(config: &mut heist_worker::Config) {
    use_docker(config);
    let socket = config
        .base_workspace
        .parent()
        .expect("parent")
        .join("gate.sock");
    config.docker_host = Some(format!("unix://{}", socket.display()));
}

/// Waits (up to 2 s) for a gate to bind its socket.
async fn wait_for_socket(socket: &std::path::Path) {
    for _ in 0..100 {
        if socket.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 POST of a JSON body over a Unix socket; the whole answer as text.
async fn raw_post(socket: &std::path::Path, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

/// The docker CLI talking to the gate instead of the engine; its stdout or its stderr.
fn through_gate(socket: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .expect("docker");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A worker that reaches the engine only through `worker engine-gate` (what compose runs)
/// works as one with the raw socket, while the gate refuses what would loosen a container,
/// touch the host's other containers or mount anything outside the workspaces. (Two runtime
/// threads: the gate runs in the test process and serves the docker CLI the test waits on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_gate_passes_the_backend_and_refuses_everything_else() {
    if !docker_ready("the_engine_gate_passes_the_backend_and_refuses_everything_else") {
        return;
    }
    let dir = crate::harness::tempdir();
    let socket = dir.path().join("gate.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gate_args = heist_worker::engine_gate::GateArgs {
        socket: socket.clone(),
        engine: "/var/run/docker.sock".into(),
        image: image(),
        network: "none".into(),
        workspaces: dir.path().to_owned(),
        host_workspaces: "auto".into(),
        socket_owner: None,
        socket_mode: "600".into(),
        max_body_bytes: 1 << 20,
        max_containers: 512,
        probe: false,
    };
    let gate = tokio::spawn(heist_worker::engine_gate::run(gate_args.clone(), async {
        let _ = stopped.await;
    }));
    wait_for_socket(&socket).await;

    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("wg").configure(use_gate),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["wg"]).await;
    let session = client
        .create_session(&[("sandbox", "docker")])
        .await
        .expect("session")
        .id;
    let run = client
        .call(
            &session,
            "exec",
            json!({"command": "echo through the gate; id -u; cat /proc/1/status | grep ^Uid"}),
        )
        .await
        .expect("exec");
    assert!(!run.is_error, "{}", structured(&run));
    let stdout = out(&run, "stdout");
    assert!(stdout.starts_with("through the gate\n"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let (uid, init) = (
        lines[1],
        lines[2].split_whitespace().nth(1).unwrap_or_default(),
    );
    assert_ne!(uid, "0", "the command ran as root");
    assert!(
        init != uid && init != "0",
        "the container's init runs as {init}, the command as {uid}"
    );
    let py = client
        .call(&session, "run.python", json!({"code": "print(6 * 7)"}))
        .await
        .expect("run.python");
    assert_eq!(out(&py, "stdout"), "42\n", "{}", structured(&py));
    a_timeout_stops_the_command(&mut client, &session).await;
    a_memory_hog_is_out_of_memory(&mut client, &session).await;
    let ours = containers_of(&session);
    assert_eq!(ours.len(), 1);

    // What the gate refuses, asked with the docker CLI.
    let refused = |args: &[&str], why: &str| {
        let err = through_gate(&socket, args).expect_err(&args.join(" "));
        assert!(err.contains("engine gate"), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    let img = image();
    refused(&["run", "--rm", "--privileged", &img, "true"], "");
    refused(
        &[
            "run", "--rm", "-v", "/:/host", "--user", "1000", &img, "true",
        ],
        "",
    );
    refused(&["ps", "-a"], "filter on the label");
    refused(
        &["events", "--since", "1", "--until", "2"],
        "filter on the label",
    );
    // The backend's own event query (its containers' `oom` events) passes.
    let ours_only = "label=io.heist.worker=wg";
    through_gate(
        &socket,
        &[
            "events", "--filter", ours_only, "--since", "1", "--until", "2",
        ],
    )
    .expect("label-filtered events");
    refused(&["images"], "does not allow");
    refused(&["pull", "debian"], "does not allow");
    refused(&["volume", "ls"], "does not allow");
    // A container of someone else's, even with the sandbox image, cannot be touched.
    let other = docker(&["create", &img, "sleep", "1"])
        .expect("docker create")
        .trim()
        .to_owned();
    refused(&["start", &other], "not a heist sandbox container");
    refused(&["rm", "-f", &other], "not a heist sandbox container");
    docker(&["rm", "-f", &other]);
    // The session's own container can be inspected through it (the backend does).
    assert!(through_gate(&socket, &["inspect", &ours[0]]).is_ok());

    // A gate that allows no more containers refuses even a confined one.
    let full = dir.path().join("full.sock");
    let (stop_full, full_stopped) = tokio::sync::oneshot::channel::<()>();
    let full_gate = tokio::spawn(heist_worker::engine_gate::run(
        heist_worker::engine_gate::GateArgs {
            socket: full.clone(),
            max_containers: 0,
            ..gate_args
        },
        async {
            let _ = full_stopped.await;
        },
    ));
    wait_for_socket(&full).await;
    let mount = dir.path().join("probe");
    std::fs::create_dir_all(&mount).expect("mkdir");
    let body = json!({
        "Image": image(), "User": "65534:65534", "Labels": {"io.heist.worker": "probe"},
        "HostConfig": {
            "Mounts": [{"Type": "bind", "Source": mount, "Target": "/workspace"}],
            "NetworkMode": "none", "ReadonlyRootfs": true, "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"], "Memory": 64 << 20, "PidsLimit": 16,
        }
    })
    .to_string();
    let answer = raw_post(&full, "/containers/create", &body).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("HEIST_GATE_MAX_CONTAINERS"), "{answer}");
    let _ = stop_full.send(());
    full_gate.await.expect("gate task").expect("gate");

    client.close_session(&session).await.expect("close");
    assert!(containers_of(&session).is_empty());
    worker.stop().await;
    coord.stop().await;
    let _ = stop.send(());
    gate.await.expect("gate task").expect("gate");
    assert!(!socket.exists(), "the gate left its socket behind");
}
