//! Resource exhaustion through the real cluster (worker as root, as in CI): a memory bomb
//! spread over processes, a fork bomb, FIFOs handed to fs.read by the hundred, and an output
//! flood. Each is bounded by the limit meant for it and reported as such; afterwards the host
//! is checked from outside (no process or cgroup left) and another session still works.

use std::path::{Path, PathBuf};

use futures::future::join_all;
use heist_proto::{errors::reason, v1};
use serde_json::{Value as Json, json};
use tonic::Code;

use crate::harness::*;

struct Lab {
    _dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    client: Client,
}

async fn lab(configure: fn(&mut heist_worker::Config)) -> Lab {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("w1").configure(configure),
    )
    .await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let url = worker.url();
    wait_for("the worker's health SERVING", || {
        let url = url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    Lab {
        _dir: dir,
        coord,
        worker,
        client,
    }
}

impl Lab {
    async fn session(&mut self) -> String {
        self.client.create_session(&[]).await.expect("session").id
    }

    async fn exec(
        &mut self,
        session: &str,
        script: &str,
    ) -> Result<v1::CallToolResponse, tonic::Status> {
        self.client
            .call(session, "exec", json!({"command": script}))
            .await
    }

    async fn sh_ok(&mut self, session: &str, script: &str) -> String {
        let resp = self.exec(session, script).await.expect("exec");
        assert!(!resp.is_error, "{script}: {}", structured(&resp));
        structured(&resp)["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A second session holding `keep.txt`.
    async fn bystander(&mut self) -> String {
        let other = self.session().await;
        self.sh_ok(&other, "echo precious > keep.txt").await;
        other
    }

    /// The worker serves and the bystander's fs.read and exec still work.
    async fn assert_healthy(&mut self, other: &str) {
        assert!(
            health_serving(&self.worker.url()).await,
            "worker not serving"
        );
        let read = self
            .client
            .call(other, "fs.read", json!({"path": "keep.txt"}))
            .await
            .expect("fs.read in another session");
        assert_eq!(text_of(&read), "precious\n");
        assert_eq!(self.sh_ok(other, "cat keep.txt").await, "precious\n");
    }

    /// The worker's cgroup subtree in each hierarchy that has one.
    fn worker_cgroups(&self) -> Vec<PathBuf> {
        let base = &self.worker.base_workspace;
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.clone());
        let name = heist_worker::sandbox::cgroup_name("w1", &base);
        ["memory", "pids", "cpu", ""]
            .iter()
            .map(|c| {
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join("heist")
                    .join(&name)
            })
            .filter(|dir| dir.exists())
            .collect()
    }

    async fn stop(self) {
        let dirs = self.worker_cgroups();
        self.worker.stop().await;
        self.coord.stop().await;
        // A stopped worker leaves no cgroup behind.
        for dir in dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}

/// Command cgroups (`cmd-*`) of `session` that exist right now, in every hierarchy.
fn command_cgroups(session: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for controller in ["memory", "pids", "cpu", ""] {
        let heist = Path::new("/sys/fs/cgroup").join(controller).join("heist");
        let Ok(workers) = std::fs::read_dir(&heist) else {
            continue;
        };
        for worker in workers.flatten() {
            let Ok(commands) = std::fs::read_dir(worker.path().join(session)) else {
                continue;
            };
            found.extend(
                commands
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("cmd-"))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

async fn wait_no_command_cgroups(session: &str) {
    wait_for("the command cgroups removed", || async {
        command_cgroups(session).is_empty().then_some(())
    })
    .await;
}

fn small_memory(config: &mut heist_worker::Config) {
    config.quotas.session_memory_bytes = 64 << 20;
    config.quotas.command_memory_bytes = 512 << 20;
}

#[tokio::test]
async fn a_memory_bomb_over_many_processes_is_killed_at_the_session_limit() {
    let mut lab = lab(small_memory).await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    // Six processes of 24 MiB each: every one is far below the 4 GiB address-space rlimit and
    // the 512 MiB command limit, together they are over the session's 64 MiB.
    let bomb = "for i in 1 2 3 4 5 6; do python3 -c 'import time; b = b\"x\" * (24 << 20); time.sleep(3)' & done; wait; echo survived";
    let err = lab.exec(&s, bomb).await.expect_err("out of memory");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("session_memory_bytes"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("out of memory")
            && err.message().contains("67108864")
            && err.message().contains("HEIST_QUOTA_SESSION_MEMORY_BYTES"),
        "{}",
        err.message()
    );
    // Small commands still run in the session afterwards, and nothing is left on the host.
    assert_eq!(lab.sh_ok(&s, "echo fine").await, "fine\n");
    wait_no_command_cgroups(&s).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

fn few_session_processes(config: &mut heist_worker::Config) {
    config.quotas.processes = 200;
    config.quotas.session_processes = 16;
}

#[tokio::test]
async fn a_fork_bomb_is_bounded_by_the_session_pids_limit() {
    let mut lab = lab(few_session_processes).await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    // RLIMIT_NPROC would allow 200; the session's pids cgroup allows 16 in all.
    let code = "import os, sys, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork failed', e.errno, file=sys.stderr)\nprint(n)\n";
    let resp = lab
        .client
        .call(&s, "run.python", json!({"code": code}))
        .await
        .expect("run.python");
    let out = structured(&resp);
    let forked: u32 = out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count: {out}"));
    assert!(
        forked < 16,
        "{forked} processes despite a session limit of 16"
    );
    assert!(
        out["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("fork failed 11"),
        "{out}"
    );
    wait_no_command_cgroups(&s).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

fn defaults(_: &mut heist_worker::Config) {}

#[tokio::test]
async fn the_worker_says_which_resource_limits_it_enforces() {
    let mut lab = lab(defaults).await;
    let workers = lab.client.workers().await;
    let isolation = &workers[0].isolation;
    assert!(
        isolation.iter().any(|i| i.starts_with("cgroup-v")
            && i.contains("memory")
            && i.contains("pids")
            && i.contains("cpu")),
        "{isolation:?}"
    );
    assert!(
        isolation.iter().any(|i| i == "disk-quota:polling"),
        "{isolation:?}"
    );
    // Its subtree exists while it runs (and `stop` checks it is gone afterwards).
    assert!(
        !lab.worker_cgroups().is_empty(),
        "no cgroup subtree for the worker"
    );
    lab.stop().await;
}

fn small_disk(config: &mut heist_worker::Config) {
    config.quotas.disk_bytes = 16 << 20;
    config.quota_poll_interval = std::time::Duration::from_millis(50);
}

#[tokio::test]
async fn unlinked_files_held_open_count_against_the_disk_quota() {
    let mut lab = lab(small_disk).await;
    let s = lab.session().await;
    let other = lab.bystander().await;

    // Four processes each write 10 MiB to a file they unlinked first: every file is under
    // RLIMIT_FSIZE and invisible to a walk of the workspace, together they hold 40 MiB of a
    // 16 MiB quota. They keep the files open until killed.
    let fill = "import os, time
for i in range(4):
    if os.fork() == 0:
        f = open('ghost%d' % i, 'wb')
        os.unlink('ghost%d' % i)
        for _ in range(10):
            f.write(b'x' * (1 << 20))
            f.flush()
        time.sleep(60)
        os._exit(0)
for _ in range(4):
    os.wait()
";
    let err = lab
        .client
        .call(&s, "run.python", json!({"code": fill, "timeout_s": 120}))
        .await
        .expect_err("over the disk quota");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "limit").as_deref(),
        Some("disk_bytes"),
        "{}",
        err.message()
    );
    // Killed, so the space is free again and the session works.
    assert_eq!(lab.sh_ok(&s, "echo fine").await, "fine\n");
    wait_no_command_cgroups(&s).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn fifo_reads_are_refused_at_once_while_another_session_keeps_working() {
    let mut lab = lab(defaults).await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    lab.sh_ok(&s, "mkfifo pipe").await;

    let reads = (0..500).map(|_| {
        let mut client = lab.client.tools.clone();
        let token = lab.client.token.clone();
        let session = s.clone();
        async move {
            let arguments =
                heist_proto::json::json_to_struct(&json!({"path": "pipe"})).expect("object");
            let mut request = authed(
                &token,
                v1::CallToolRequest {
                    session_id: session,
                    tool: "fs.read".into(),
                    arguments: Some(arguments),
                    request_id: String::new(),
                },
            );
            // Before the fix, a read blocked in open(2); with a deadline it fails instead of
            // hanging the test.
            request.set_timeout(std::time::Duration::from_secs(20));
            client
                .call_tool(request)
                .await
                .map(tonic::Response::into_inner)
        }
    });
    let mut bystander = Client::with_token(&lab.coord.url(), lab.client.token.clone()).await;
    let bystander_work = async {
        let read = bystander
            .call(&other, "fs.read", json!({"path": "keep.txt"}))
            .await
            .expect("bystander fs.read");
        let exec = bystander
            .call(&other, "exec", json!({"command": "cat keep.txt"}))
            .await
            .expect("bystander exec");
        (text_of(&read), exec)
    };
    let (results, (read, exec)) = tokio::join!(join_all(reads), bystander_work);
    assert_eq!(read, "precious\n");
    assert_eq!(structured(&exec)["stdout"], Json::from("precious\n"));

    let mut refused = 0;
    for result in results {
        match result {
            Err(err) => {
                if err.code() == Code::ResourceExhausted {
                    // The session's share of the fs pool was taken at that instant: also an
                    // answer at once, naming the limit.
                    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
                    continue;
                }
                assert_status(&err, Code::FailedPrecondition, reason::NOT_A_REGULAR_FILE);
                assert!(err.message().contains("fifo"), "{}", err.message());
                refused += 1;
            }
            Ok(resp) => panic!("a FIFO was read: {resp:?}"),
        }
    }
    assert!(refused > 0, "no read got the FIFO error");
    // One at a time, every read gets the clear error.
    let err = lab
        .client
        .call(&s, "fs.read", json!({"path": "pipe"}))
        .await
        .expect_err("a FIFO");
    assert_status(&err, Code::FailedPrecondition, reason::NOT_A_REGULAR_FILE);
    let err = lab
        .client
        .call(
            &s,
            "fs.write",
            json!({"path": "pipe", "content": "x", "append": true}),
        )
        .await
        .expect_err("a FIFO");
    assert_status(&err, Code::FailedPrecondition, reason::NOT_A_REGULAR_FILE);
    lab.assert_healthy(&other).await;
    lab.stop().await;
}

#[tokio::test]
async fn an_output_flood_is_capped() {
    let mut lab = lab(defaults).await;
    let s = lab.session().await;
    let other = lab.bystander().await;
    let resp = lab
        .exec(&s, "head -c 200000000 /dev/zero | tr '\\0' x")
        .await
        .expect("exec");
    let out = structured(&resp);
    assert_eq!(
        out["stdout_truncated"],
        Json::from(true),
        "{}",
        out["stdout_truncated"]
    );
    assert!(
        out["stdout"].as_str().unwrap_or_default().len() <= 1 << 20,
        "kept more than the 1 MiB cap"
    );
    wait_no_command_cgroups(&s).await;
    lab.assert_healthy(&other).await;
    lab.stop().await;
}
