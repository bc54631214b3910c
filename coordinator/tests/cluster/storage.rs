//! Storage faults: the coordinator's (and a worker's) data directory on a small tmpfs, filled
//! with a ballast file below the free-space reserve. Mutations are refused with STORE_FULL
//! before anything is applied, readiness goes NOT_SERVING, reads keep working, and once the
//! ballast is removed everything resumes by itself; a SIGTERM then exits 0.
//!
//! Mounting needs root (CAP_SYS_ADMIN). Without it these tests report SKIPPED loudly, unless
//! HEIST_REQUIRE_TMPFS=1 makes that a failure (CI sets it where it runs as root).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use heist_proto::errors::reason;
use serde_json::json;
use tonic::Code;

use crate::harness::*;

/// The tmpfs size and the reserve the tests configure.
const TMPFS_BYTES: u64 = 48 << 20;
const RESERVE_BYTES: u64 = 16 << 20;

/// A tmpfs mounted for one test, unmounted (lazily, so a straggling process cannot keep it)
/// when dropped, whatever the test's outcome.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `path`, or `None` (after saying why) when mounting is
    /// not permitted here and HEIST_REQUIRE_TMPFS is not set.
    fn mount(path: &Path, bytes: u64) -> Option<Self> {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        let why = match out {
            Ok(out) if out.status.success() => {
                return Some(Self {
                    path: path.to_path_buf(),
                });
            }
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(err) => err.to_string(),
        };
        assert!(
            std::env::var("HEIST_REQUIRE_TMPFS").as_deref() != Ok("1"),
            "HEIST_REQUIRE_TMPFS=1 but a tmpfs cannot be mounted: {why}"
        );
        eprintln!(
            "SKIPPED: the storage-fault test needs to mount a tmpfs (run as root): {why}; \
             set HEIST_REQUIRE_TMPFS=1 to make this a failure"
        );
        None
    }

    fn free(&self) -> u64 {
        heist_proto::space::free_bytes(&self.path).expect("statvfs")
    }

    /// Writes a ballast file that leaves about `leave` bytes free; returns its path.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path.join("ballast");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("ballast");
        let chunk = vec![0xA5u8; 1 << 20];
        while self.free() > leave + chunk.len() as u64 {
            file.write_all(&chunk).expect("ballast write");
        }
        file.sync_all().expect("ballast sync");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg("-l").arg(&self.path).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("cannot unmount {}: {status:?}", self.path.display());
        }
    }
}

/// `GET /readyz` until its status is `want`; returns the body.
async fn wait_readyz(addr: std::net::SocketAddr, want: u16) -> String {
    wait_for(&format!("/readyz {want}"), || async move {
        let (status, body) = http_get(addr, "/readyz").await;
        (status == want).then_some(body)
    })
    .await
}

/// Polls the child until it exits, for at most WAIT.
async fn wait_exit(child: &mut std::process::Child) -> ExitStatus {
    wait_for("the coordinator to exit", || {
        let status = child.try_wait().expect("try_wait");
        async move { status }
    })
    .await
}

#[tokio::test]
async fn a_full_coordinator_disk_refuses_mutations_unapplied_and_recovers_without_restart() {
    let dir = crate::harness::tempdir();
    let Some(disk) = Tmpfs::mount(&dir.path().join("coordinator"), TMPFS_BYTES) else {
        return;
    };
    let data = disk.path.join("data");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut coord = spawn_coordinator_process_with(
        port,
        &data,
        &dir.path().join("c.log"),
        &[("HEIST_STORE_MIN_FREE_BYTES", &RESERVE_BYTES.to_string())],
    );
    wait_for("coordinator process SERVING", || {
        let url = url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    let worker = Worker::start(&url, dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&url).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("create");
    client
        .call(
            &session.id,
            "fs.write",
            json!({"path": "before.txt", "content": "before"}),
        )
        .await
        .expect("write with space");
    wait_readyz(addr, 200).await;

    // Below the reserve, with room left: the refusal is the reserve's, not the disk's.
    let ballast = disk.fill_leaving(RESERVE_BYTES / 2);
    let write = json!({"path": "during.txt", "content": "refused"});
    let err = client
        .call_with_id(&session.id, "fs.write", write.clone(), "full-1")
        .await
        .expect_err("a mutation below the reserve");
    assert_status(&err, Code::ResourceExhausted, reason::STORE_FULL);
    assert!(
        err.message().contains(&data.display().to_string()) && err.message().contains("free"),
        "the message names the store's path and what to do: {}",
        err.message()
    );
    let err = client
        .call(&session.id, "fs.write", write.clone())
        .await
        .expect_err("a mutation without a request id");
    assert_status(&err, Code::ResourceExhausted, reason::STORE_FULL);
    let err = client
        .create_session(&[])
        .await
        .expect_err("a session create");
    assert_status(&err, Code::ResourceExhausted, reason::STORE_FULL);

    // Readiness follows, on both probes; reads still work.
    let body = wait_readyz(addr, 503).await;
    assert!(body.contains("reserve"), "{body}");
    wait_for("health NOT_SERVING", || {
        let url = url.clone();
        async move { (!health_serving(&url).await).then_some(()) }
    })
    .await;
    let read = client
        .call(&session.id, "fs.read", json!({"path": "before.txt"}))
        .await
        .expect("a read while full");
    assert_eq!(text_of(&read), "before");
    client.get_session(&session.id).await.expect("get session");

    // Space back: ready again by itself, and nothing of the refused calls was applied.
    std::fs::remove_file(&ballast).expect("remove ballast");
    wait_readyz(addr, 200).await;
    wait_for("health SERVING again", || {
        let url = url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    let missing = client
        .call(&session.id, "fs.read", json!({"path": "during.txt"}))
        .await;
    let applied = missing.as_ref().is_ok_and(|r| !r.is_error);
    assert!(
        !applied,
        "a refused write must not have been applied on the worker: {missing:?}"
    );
    let wrote = client
        .call_with_id(&session.id, "fs.write", write, "full-1")
        .await
        .expect("the same write, retried with the same request id, after space is freed");
    assert!(!wrote.is_error && !wrote.replayed, "{wrote:?}");
    let read = client
        .call(&session.id, "fs.read", json!({"path": "during.txt"}))
        .await
        .expect("read back");
    assert_eq!(text_of(&read), "refused");

    // Completely full this time: a SIGTERM still stops the coordinator cleanly.
    let ballast = disk.fill_leaving(0);
    let mut filler = std::fs::OpenOptions::new()
        .append(true)
        .open(&ballast)
        .expect("ballast");
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    let err = client
        .call(
            &session.id,
            "fs.write",
            json!({"path": "x", "content": "x"}),
        )
        .await
        .expect_err("a mutation on a full disk");
    assert_status(&err, Code::ResourceExhausted, reason::STORE_FULL);
    coord.sigterm();
    let status = wait_exit(&mut coord.0).await;
    let log = std::fs::read_to_string(dir.path().join("c.log")).unwrap_or_default();
    assert!(
        status.success(),
        "SIGTERM after a full disk: {status:?}\n{log}"
    );
    drop(coord);
    worker.stop().await;
    drop(disk);
}

#[tokio::test]
async fn a_full_worker_disk_refuses_mutating_calls_unapplied_and_recovers() {
    let dir = crate::harness::tempdir();
    let Some(disk) = Tmpfs::mount(&dir.path().join("worker-state"), TMPFS_BYTES) else {
        return;
    };
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let state_dir = disk.path.join("state");
    let blobs = disk.path.join("blobs");
    let worker = Worker::start(
        &coord.url(),
        dir.path(),
        WorkerOpts::new("w1").configure(move |c| {
            c.state_dir = Some(state_dir);
            c.blob_cache_dir = Some(blobs);
            c.min_free_bytes = RESERVE_BYTES;
        }),
    )
    .await;
    let worker_url = worker.url();
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("create");
    client
        .call(
            &session.id,
            "fs.write",
            json!({"path": "before.txt", "content": "before"}),
        )
        .await
        .expect("write with space");

    let ballast = disk.fill_leaving(RESERVE_BYTES / 2);
    let write = json!({"path": "during.txt", "content": "refused"});
    let err = client
        .call_with_id(&session.id, "fs.write", write.clone(), "wfull-1")
        .await
        .expect_err("a mutation on a worker below its reserve");
    assert_status(&err, Code::ResourceExhausted, reason::STORE_FULL);
    assert!(
        err.message().contains("worker"),
        "the message names the worker's store: {}",
        err.message()
    );
    wait_for("worker health NOT_SERVING", || {
        let url = worker_url.clone();
        async move { (!health_serving(&url).await).then_some(()) }
    })
    .await;
    let read = client
        .call(&session.id, "fs.read", json!({"path": "before.txt"}))
        .await
        .expect("a read while the worker's disk is full");
    assert_eq!(text_of(&read), "before");

    std::fs::remove_file(&ballast).expect("remove ballast");
    wait_for("worker health SERVING again", || {
        let url = worker_url.clone();
        async move { health_serving(&url).await.then_some(()) }
    })
    .await;
    let missing = client
        .call(&session.id, "fs.read", json!({"path": "during.txt"}))
        .await;
    let applied = missing.as_ref().is_ok_and(|r| !r.is_error);
    assert!(
        !applied,
        "a refused write must not have been applied: {missing:?}"
    );
    let wrote = client
        .call_with_id(&session.id, "fs.write", write, "wfull-1")
        .await
        .expect("the same write after space is freed");
    assert!(!wrote.is_error && !wrote.replayed, "{wrote:?}");
    worker.stop().await;
    coord.stop().await;
    drop(disk);
}
