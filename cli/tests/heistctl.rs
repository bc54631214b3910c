//! Process-level tests: a real coordinator and worker served in this test process on
//! 127.0.0.1:0, driven by the real `heistctl` binary with HOME/XDG_CONFIG_HOME in a temp dir.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use heist_proto::v1::WorkerState;
use heistctl::client::Client;
use serde_json::Value as Json;
use tokio::{io::AsyncWriteExt, sync::oneshot, task::JoinHandle};

const JOIN_TOKEN: &str = "test-join-token-0123456789";
const ADMIN_SECRET: &str = "test-admin-secret-0123456789";
const WORKER_ID: &str = "worker-1";
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// An in-process coordinator + one worker (labelled `zone=test`) and a private HOME.
struct Cluster {
    url: String,
    home: PathBuf,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).expect("home");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind coordinator");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let config = heist_coordinator::Config {
            data_dir: tmp.path().join("coordinator"),
            join_token: JOIN_TOKEN.to_owned(),
            admin_client_secret: ADMIN_SECRET.to_owned(),
            ..heist_coordinator::Config::default()
        };
        let (stop_coordinator, stopped) = oneshot::channel::<()>();
        let coordinator = tokio::spawn(async move {
            heist_coordinator::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("coordinator serve");
        });

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind worker");
        let config = heist_worker::Config {
            worker_id: WORKER_ID.to_owned(),
            coordinator_addr: url.clone(),
            base_workspace: tmp.path().join("workspaces"),
            labels: [("zone".to_owned(), "test".to_owned())].into(),
            join_token: JOIN_TOKEN.to_owned(),
            // Built next to heistctl (`make test` builds every binary first).
            sandbox_helper: Some(
                PathBuf::from(env!("CARGO_BIN_EXE_heistctl")).with_file_name("heist-sandbox"),
            ),
            ..heist_worker::Config::default()
        };
        let (stop_worker, stopped) = oneshot::channel::<()>();
        let worker = tokio::spawn(async move {
            heist_worker::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("worker serve");
        });

        let cluster = Self {
            url,
            home,
            stops: vec![stop_worker, stop_coordinator],
            tasks: vec![worker, coordinator],
            _tmp: tmp,
        };
        cluster.wait_worker_ready().await;
        cluster
    }

    /// Polls ListWorkers (as the admin) until the worker is READY, with a deadline.
    async fn wait_worker_ready(&self) {
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(client) = Client::connect(&self.url, Duration::from_secs(2)).await
                && let Ok(token) = client.issue_token("admin", ADMIN_SECRET, Vec::new()).await
                && let Ok(workers) = client.with_token(token.access_token).list_workers().await
                && workers
                    .iter()
                    .any(|w| w.id == WORKER_ID && w.state == WorkerState::Ready as i32)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker not READY within {READY_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs heistctl with a clean environment pointing at this cluster.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None).await
    }

    async fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_heistctl"));
        cmd.env_clear()
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("HEIST_COORDINATOR", &self.url)
            .env("NO_COLOR", "1")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn heistctl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
            drop(pipe);
        }
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("heistctl finished within 60 s")
            .expect("heistctl output")
    }

    /// Runs heistctl with `--output json`, expects success, parses stdout.
    async fn json(&self, args: &[&str]) -> Json {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.run(&all).await;
        assert_eq!(code(&out), 0, "heistctl {args:?} failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "heistctl {args:?}: stdout is not JSON ({e}): {}",
                stdout(&out)
            )
        })
    }

    async fn login(&self) {
        let out = self
            .run_with_stdin(
                &["login", "--client-id", "admin", "--client-secret-stdin"],
                Some(&format!("{ADMIN_SECRET}\n")),
            )
            .await;
        assert_eq!(code(&out), 0, "login failed: {}", stderr(&out));
    }

    fn credentials_file(&self) -> PathBuf {
        self.home
            .join(".config")
            .join("heist")
            .join("credentials.json")
    }

    async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stopped within 30 s")
                .expect("server task");
        }
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_caches_a_private_token_and_sessions_round_trip() {
    let cluster = Cluster::start().await;
    cluster.login().await;

    let creds = cluster.credentials_file();
    assert_eq!(mode(&creds), 0o600, "credentials file mode");
    assert_eq!(
        mode(creds.parent().expect("dir")),
        0o700,
        "credentials dir mode"
    );
    let cached: Json = serde_json::from_slice(&std::fs::read(&creds).expect("read")).expect("json");
    assert!(
        cached["coordinators"][&cluster.url]["access_token"].is_string(),
        "token cached under the coordinator URL: {cached}"
    );

    let workers = cluster.json(&["workers", "ls"]).await;
    assert_eq!(workers[0]["id"], WORKER_ID);
    assert_eq!(workers[0]["state"], "ready");

    let created = cluster
        .json(&["session", "create", "--label", "zone=test"])
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["worker_id"], WORKER_ID);
    assert_eq!(created["state"], "ready");
    assert_eq!(created["labels"]["zone"], "test");
    assert_eq!(created["owner"], "admin");
    assert!(
        created["created_at"]
            .as_str()
            .expect("created_at")
            .ends_with('Z')
    );

    // A second session, so that `ls --page-size 1` has to follow a page token.
    let other = cluster.json(&["session", "create"]).await;
    let listed = cluster.json(&["session", "ls", "--page-size", "1"]).await;
    let listed_ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(
        listed_ids.contains(&id.as_str())
            && listed_ids.contains(&other["id"].as_str().expect("id")),
        "both sessions listed across pages: {listed}"
    );
    let shown = cluster.json(&["session", "show", &id]).await;
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["worker_connected"], true);

    let table = cluster.run(&["session", "ls"]).await;
    assert_eq!(code(&table), 0);
    assert!(stdout(&table).contains(&id), "{}", stdout(&table));

    let closed = cluster.json(&["session", "close", &id]).await;
    assert_eq!(closed["state"], "closed");
    let open = cluster.json(&["session", "ls"]).await;
    assert!(
        !open
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["id"] == id.as_str()),
        "closed sessions are hidden without --all: {open}"
    );
    let all = cluster.json(&["session", "ls", "--all"]).await;
    assert!(
        all.as_array()
            .expect("array")
            .iter()
            .any(|s| s["id"] == id.as_str() && s["state"] == "closed"),
        "{all}"
    );

    let out = cluster.run(&["logout"]).await;
    assert_eq!(code(&out), 0);
    let out = cluster.run(&["session", "ls"]).await;
    assert_eq!(code(&out), 3, "after logout: {}", stderr(&out));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_route_echo_and_calc() {
    let cluster = Cluster::start().await;
    cluster.login().await;
    let session = cluster.json(&["session", "create"]).await;
    let id = session["id"].as_str().expect("id").to_owned();

    let tools = cluster.json(&["tool", "ls", "--session", &id]).await;
    let names: Vec<&str> = tools
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"echo") && names.contains(&"calc"),
        "{names:?}"
    );

    let echo = cluster
        .json(&[
            "tool",
            "call",
            &id,
            "echo",
            "--json",
            r#"{"text": "hi", "n": 1}"#,
            "--arg",
            "n=3",
            "--arg",
            "tags=[\"a\"]",
        ])
        .await;
    assert_eq!(echo["is_error"], false);
    assert_eq!(echo["worker_id"], WORKER_ID);
    assert_eq!(echo["replayed"], false);
    assert_eq!(
        echo["content"][0],
        serde_json::json!({"type": "json", "json": {"text": "hi", "n": 3, "tags": ["a"]}})
    );

    let calc = cluster
        .json(&["tool", "call", &id, "calc", "--arg", "expression=2*(3+4)^2"])
        .await;
    assert_eq!(calc["is_error"], false);
    assert!(calc.to_string().contains("98"), "{calc}");

    // Table output prints the blocks themselves.
    let out = cluster
        .run(&["tool", "call", &id, "calc", "--arg", "expression=1+1"])
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains('2'), "{}", stdout(&out));

    // Retrying with the same request id replays the first result.
    let args = [
        "tool",
        "call",
        &id,
        "fs.write",
        "--arg",
        "path=a.txt",
        "--arg",
        "content=x",
        "--request-id",
        "req-1",
    ];
    let first = cluster.json(&args).await;
    let again = cluster.json(&args).await;
    assert_eq!(first["replayed"], false);
    assert_eq!(again["replayed"], true);

    // A tool that runs and fails exits 6; a schema violation is an error with its reason.
    let out = cluster
        .run(&["tool", "call", &id, "fs.read", "--arg", "path=missing.txt"])
        .await;
    assert_eq!(
        code(&out),
        6,
        "stdout: {} stderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let out = cluster
        .run(&["tool", "call", &id, "calc", "--arg", "expression=42"])
        .await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reason: SCHEMA_VIOLATION"),
        "{}",
        stderr(&out)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_scripts_what_went_wrong() {
    let cluster = Cluster::start().await;

    // No token: exit 3 with a hint to log in, before anything is sent.
    let out = cluster.run(&["session", "ls"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("heistctl login"), "{}", stderr(&out));

    // Wrong secret: UNAUTHENTICATED, exit 3.
    let out = cluster
        .run(&[
            "login",
            "--client-id",
            "admin",
            "--client-secret",
            "wrong-secret-0123456789",
        ])
        .await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));

    // A forged --token is refused by the coordinator: exit 3.
    let out = cluster
        .run(&["--token", "not.a.jwt", "workers", "ls"])
        .await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));

    cluster.login().await;

    // Unknown session: exit 4 with the ErrorInfo reason on stderr.
    let out = cluster.run(&["session", "show", "s-does-not-exist"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("reason: SESSION_NOT_FOUND"), "{err}");
    let out = cluster
        .run(&["tool", "call", "s-does-not-exist", "echo"])
        .await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    // No worker matches the labels: RESOURCE_EXHAUSTED, exit 5.
    let out = cluster
        .run(&["session", "create", "--label", "zone=elsewhere"])
        .await;
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reason: NO_MATCHING_WORKER"),
        "{}",
        stderr(&out)
    );

    // Usage errors: 2.
    let out = cluster.run(&["tool", "call"]).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = cluster
        .run(&["tool", "call", "s-x", "echo", "--json", "[1]"])
        .await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    // Nothing listening: exit 5.
    let out = cluster
        .run(&[
            "--coordinator",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "workers",
            "ls",
        ])
        .await;
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_run_python_stream_output_and_exit_with_the_commands_code() {
    let cluster = Cluster::start().await;
    cluster.login().await;
    let created = cluster.json(&["session", "create"]).await;
    let id = created["id"].as_str().expect("id").to_owned();

    let out = cluster
        .run(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ])
        .await;
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err\n"), "{}", stderr(&out));

    let out = cluster
        .run(&["exec", "--shell", &id, "--", "echo a | tr a b"])
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "b\n");

    let out = cluster
        .run_with_stdin(
            &["run-python", &id, "-", "x"],
            Some("import sys\nprint('py', sys.argv[1])\nsys.exit(3)\n"),
        )
        .await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(stdout(&out), "py x\n");

    // A timeout exits 124 like timeout(1), and says so.
    let out = cluster
        .run(&["exec", &id, "--timeout-s", "1", "--", "sleep", "30"])
        .await;
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    cluster.stop().await;
}

#[test]
fn completions_print_a_script() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_heistctl"))
        .args(["completions", "bash"])
        .output()
        .expect("run heistctl");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("heistctl"), "{}", stdout(&out));
}
