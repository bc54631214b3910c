//! The file-system disk quota (HEIST_DISK_QUOTA=fs, worker as root as in CI): every session's
//! workspace is its own size-limited file system, so parallel writers and files written after
//! being unlinked cannot take more than the quota plus the documented slack; the session works
//! afterwards; closing leaves no mount and no image; a restarted worker mounts its sessions'
//! file systems again with their files. File systems made ahead of time (HEIST_DISK_POOL) are
//! bounded the same, handed to one session only, formatted on demand when the pool is empty,
//! and a worker killed with SIGKILL leaves none behind once it has started again.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use heist_proto::{errors::reason, v1};
use heist_worker::diskfs;
use serde_json::json;
use tonic::Code;

use crate::harness::*;

const QUOTA: u64 = 16 << 20;

fn fs_quota(config: &mut heist_worker::Config) {
    config.disk_quota = diskfs::DiskQuotaMode::Fs;
    config.quotas.disk_bytes = QUOTA;
    // Polling never gets a say: the file system alone bounds the writers.
    config.quota_poll_interval = std::time::Duration::from_secs(3600);
    // Every session's file system is formatted when it opens (the pool has its own tests).
    config.disk_pool = 0;
}

/// Four processes writing 10 MiB each at once (each file is under RLIMIT_FSIZE; together 40
/// MiB against the 16 MiB quota); prints how many failed.
const WRITERS: &str = "import os
for i in range(4):
    if os.fork() == 0:
        try:
            with open('w%d' % i, 'wb') as f:
                for _ in range(10):
                    f.write(b'x' * (1 << 20))
                    f.flush()
        except OSError:
            os._exit(1)
        os._exit(0)
failed = sum(os.wait()[1] != 0 for _ in range(4))
print(failed)
";

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> usize {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    devices
        .filter_map(Result::ok)
        .filter_map(|d| std::fs::read_to_string(d.path().join("loop/backing_file")).ok())
        .filter(|f| Path::new(f.trim()).starts_with(&dir))
        .count()
}

/// The worker's pool directory in `images` (`pool-<worker id>-<digest>`), if it has one.
fn pool_dir(images: &Path) -> Option<PathBuf> {
    std::fs::read_dir(images)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pool-"))
        })
}

/// The pool's complete file systems (mounted, mkfs's lost+found gone): their images' inodes.
/// The refill makes one at a time, so all but at most the last are in the pool's list.
fn pool_ready(images: &Path) -> Vec<u64> {
    let Some(dir) = pool_dir(images) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && is_mount_point(p) && !p.join("lost+found").exists())
        .filter_map(|p| std::fs::metadata(p.with_extension("img")).ok())
        .map(|m| m.ino())
        .collect()
}

/// Waits until the pool of the worker whose images are in `images` holds `n` file systems.
async fn pool_filled(images: &Path, n: usize) -> Vec<u64> {
    let images = images.to_path_buf();
    wait_for(&format!("{n} file systems ready in the pool"), || {
        let images = images.clone();
        async move {
            let ready = pool_ready(&images);
            (ready.len() == n).then_some(ready)
        }
    })
    .await
}

fn image(dir: &Path, session: &str) -> PathBuf {
    dir.join("disk-images").join(format!("{session}.img"))
}

struct Lab {
    dir: crate::harness::Scratch,
    coord: Coordinator,
    worker: Worker,
    client: Client,
}

async fn lab() -> Lab {
    lab_with_pool(0).await
}

/// A lab whose worker keeps `pool` file systems ready.
async fn lab_with_pool(pool: usize) -> Lab {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let opts = WorkerOpts::new("w1").configure(move |config| {
        fs_quota(config);
        config.disk_pool = pool;
    });
    let worker = Worker::start(&coord.url(), dir.path(), opts).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    Lab {
        dir,
        coord,
        worker,
        client,
    }
}

async fn start_worker(coord: &Coordinator, dir: &Path) -> Worker {
    Worker::start(&coord.url(), dir, WorkerOpts::new("w1").configure(fs_quota)).await
}

impl Lab {
    async fn sh(&mut self, session: &str, script: &str) -> Result<String, tonic::Status> {
        let resp = self
            .client
            .call(
                session,
                "exec",
                json!({"command": script, "timeout_s": 120}),
            )
            .await?;
        assert!(!resp.is_error, "{script}: {}", structured(&resp));
        Ok(structured(&resp)["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn images(&self) -> PathBuf {
        self.worker
            .base_workspace
            .parent()
            .expect("parent")
            .join("disk-images")
    }
}

fn assert_disk_bytes(err: &tonic::Status) {
    assert_status(err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);
    assert_eq!(
        heist_proto::errors::metadata_of(err, "limit").as_deref(),
        Some("disk_bytes"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn parallel_writers_and_unlinked_files_cannot_pass_the_file_system_quota() {
    let mut lab = lab().await;
    let isolation = lab.client.workers().await[0].isolation.clone();
    assert!(
        isolation.iter().any(|i| i == "disk-quota:fs"),
        "{isolation:?}"
    );
    let s = lab.client.create_session(&[]).await.expect("session").id;
    let ws = lab.worker.workspace(&s);
    assert!(
        is_mount_point(&ws),
        "{} is not its own file system",
        ws.display()
    );
    let bound = QUOTA + diskfs::slack(QUOTA);

    // Four writers at once: the kernel stops them, and the exec says which quota.
    let err = lab
        .client
        .call(&s, "run.python", json!({"code": WRITERS, "timeout_s": 120}))
        .await
        .expect_err("over the quota");
    assert_disk_bytes(&err);
    assert!(err.message().contains("ENOSPC"), "{}", err.message());
    let total: u64 = lab
        .sh(&s, "cat w0 w1 w2 w3 | wc -c")
        .await
        .expect("size")
        .trim()
        .parse()
        .expect("number");
    assert!(total <= bound, "{total} bytes stored, bound {bound}");
    assert!(total >= QUOTA, "{total} bytes: the quota itself must fit");

    // The session is usable again once files are deleted.
    lab.sh(&s, "rm w0 w1 w2 w3").await.expect("delete");
    lab.sh(&s, "head -c 1048576 /dev/zero > again")
        .await
        .expect("write after delete");
    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "note.txt", "content": "still here"}),
        )
        .await
        .expect("fs.write after delete");

    // Four processes each fill a file they unlinked first and hold it open: no walk sees
    // them, and still together they cannot store more than the file system holds.
    let ghosts = "import os
go_r, go_w = os.pipe()
report_r, report_w = os.pipe()
for i in range(4):
    if os.fork() == 0:
        os.close(go_w)
        fd = os.open('ghost%d' % i, os.O_CREAT | os.O_WRONLY)
        os.unlink('ghost%d' % i)
        try:
            for _ in range(10):
                os.write(fd, b'x' * (1 << 20))
        except OSError:
            pass
        os.write(report_w, b'%d\\n' % os.fstat(fd).st_size)
        os.read(go_r, 1)  # the file stays open until the parent has counted
        os._exit(0)
got = b''
while got.count(b'\\n') < 4:
    got += os.read(report_r, 4096)
os.close(go_w)
for _ in range(4):
    os.wait()
print(sum(int(n) for n in got.split()))
";
    let resp = lab
        .client
        .call(&s, "run.python", json!({"code": ghosts, "timeout_s": 120}))
        .await
        .expect("ghost writers");
    let held: u64 = structured(&resp)["stdout"]
        .as_str()
        .expect("stdout")
        .trim()
        .parse()
        .expect("number");
    assert!(
        held <= bound,
        "{held} bytes held in unlinked files, bound {bound}"
    );
    assert!(held >= QUOTA - (2 << 20), "{held}: the free space was used");
    assert_eq!(lab.sh(&s, "cat note.txt").await.expect("cat"), "still here");

    lab.client.close_session(&s).await.expect("close");
    assert!(
        !is_mount_point(&ws),
        "a closed session's file system is unmounted"
    );
    assert!(!ws.exists(), "its workspace is removed");
    assert!(
        !lab.images().join(format!("{s}.img")).exists(),
        "its image is deleted"
    );
    lab.worker.stop().await;
    lab.coord.stop().await;
}

#[tokio::test]
async fn closing_removes_the_file_system_and_a_restarted_worker_mounts_it_again() {
    let mut lab = lab().await;
    let keep = lab.client.create_session(&[]).await.expect("keep").id;
    let gone = lab.client.create_session(&[]).await.expect("gone").id;
    lab.sh(&keep, "echo kept > f").await.expect("write");
    let (keep_ws, gone_ws) = (lab.worker.workspace(&keep), lab.worker.workspace(&gone));
    assert!(is_mount_point(&keep_ws) && is_mount_point(&gone_ws));
    let images = lab.images();
    assert!(image(images.parent().expect("parent"), &gone).exists());

    lab.client.close_session(&gone).await.expect("close");
    assert!(!is_mount_point(&gone_ws), "no mount left");
    assert!(
        !image(images.parent().expect("parent"), &gone).exists(),
        "no image left"
    );

    // A stopped worker unmounts (the image stays); the next start mounts it again.
    let Lab {
        dir,
        coord,
        worker,
        mut client,
    } = lab;
    worker.stop().await;
    assert!(
        !is_mount_point(&keep_ws),
        "a stopped worker leaves no mount"
    );
    assert!(image(images.parent().expect("parent"), &keep).exists());
    let worker = start_worker(&coord, dir.path()).await;
    client.wait_ready(&["w1"]).await;
    let read = client
        .call(&keep, "fs.read", json!({"path": "f"}))
        .await
        .expect("re-adopted");
    assert_eq!(text_of(&read), "kept\n");
    assert!(
        is_mount_point(&keep_ws),
        "mounted again before it was opened"
    );
    let session = client.get_session(&keep).await.expect("get");
    assert_eq!(session.state, v1::SessionState::Ready as i32);

    client.close_session(&keep).await.expect("close");
    assert!(!is_mount_point(&keep_ws));
    assert!(!image(images.parent().expect("parent"), &keep).exists());
    worker.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn sessions_from_the_pool_are_bounded_alike_and_never_share_a_file_system() {
    let mut lab = lab_with_pool(3).await;
    let images = lab.images();
    // With three complete (at least two in the pool's list, and no refill running), an open
    // takes one of them. The next open waits for the refill, which a take starts.
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let ready = pool_filled(&images, 3).await;
        let s = lab.client.create_session(&[]).await.expect(name).id;
        let ino = std::fs::metadata(images.join(format!("{s}.img")))
            .expect("image")
            .ino();
        assert!(ready.contains(&ino), "{s}'s file system came from the pool");
        assert!(is_mount_point(&lab.worker.workspace(&s)));
        ids.push(s);
    }
    let [a, b] = <[String; 2]>::try_from(ids).expect("two sessions");
    let (a_ws, b_ws) = (lab.worker.workspace(&a), lab.worker.workspace(&b));
    let dev = |ws: &Path| std::fs::metadata(ws).expect("workspace").dev();
    assert_ne!(
        dev(&a_ws),
        dev(&b_ws),
        "each session has its own file system"
    );

    // The quota holds as on a file system formatted for the session.
    let err = lab
        .client
        .call(&a, "run.python", json!({"code": WRITERS, "timeout_s": 120}))
        .await
        .expect_err("over the quota");
    assert_disk_bytes(&err);
    assert!(err.message().contains("ENOSPC"), "{}", err.message());
    let total: u64 = lab
        .sh(&a, "cat w0 w1 w2 w3 | wc -c")
        .await
        .expect("size")
        .trim()
        .parse()
        .expect("number");
    let bound = QUOTA + diskfs::slack(QUOTA);
    assert!(total <= bound, "{total} bytes stored, bound {bound}");
    assert!(total >= QUOTA, "{total} bytes: the quota itself must fit");

    // The other session sees none of it, and no mkfs leftovers.
    let listed = lab.sh(&b, "ls -A").await.expect("ls");
    assert!(
        !listed.contains("w0") && !listed.contains("lost+found"),
        "{listed}"
    );

    // Closing deletes the image: nothing goes back to the pool.
    lab.client.close_session(&a).await.expect("close");
    assert!(!is_mount_point(&a_ws));
    assert!(
        !images.join(format!("{a}.img")).exists(),
        "a's image is deleted"
    );
    lab.sh(&b, "echo still > f").await.expect("b works");
    lab.client.close_session(&b).await.expect("close");

    // A stopping worker deletes its pool.
    lab.worker.stop().await;
    assert!(pool_dir(&images).is_none(), "the pool is gone after a stop");
    assert_eq!(mounts_beneath(lab.dir.path()), Vec::<PathBuf>::new());
    lab.coord.stop().await;
}

#[tokio::test]
async fn opens_beyond_what_the_pool_holds_format_their_own() {
    let lab = lab_with_pool(1).await;
    // A burst: at most one open finds a ready file system, the others format theirs.
    let opens = (0..5).map(|_| {
        let mut client = lab.client.clone();
        async move { client.create_session(&[]).await.map(|s| s.id) }
    });
    let ids: Vec<String> = futures::future::join_all(opens)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every open works");
    let mut devices: Vec<u64> = ids
        .iter()
        .map(|s| {
            let ws = lab.worker.workspace(s);
            assert!(is_mount_point(&ws), "{s} has its file system");
            std::fs::metadata(&ws).expect("workspace").dev()
        })
        .collect();
    devices.sort_unstable();
    devices.dedup();
    assert_eq!(devices.len(), ids.len(), "no file system is shared");
    let mut client = lab.client.clone();
    for s in &ids {
        client.close_session(s).await.expect("close");
        assert!(!lab.images().join(format!("{s}.img")).exists());
    }
    lab.worker.stop().await;
    lab.coord.stop().await;
}

/// The real `worker` binary with the `fs` disk quota and a pool of 2.
fn spawn_pool_worker(coordinator: &str, dir: &Path, log: &str) -> ChildGuard {
    let log = std::fs::File::create(dir.join(log)).expect("log");
    let child = std::process::Command::new(sibling_binary("worker"))
        .env("GRPC_PORT", free_port().to_string())
        .env("HEIST_BIND_ADDR", "127.0.0.1")
        .env("WORKER_ID", "w-pool")
        .env("COORDINATOR_ADDR", coordinator)
        .env("BASE_WORKSPACE", dir.join("ws"))
        .env("HEIST_JOIN_TOKEN", JOIN_TOKEN)
        .env("HEIST_DISK_QUOTA", "fs")
        .env("HEIST_DISK_POOL", "2")
        .env("HEIST_QUOTA_DISK_BYTES", QUOTA.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn worker");
    ChildGuard(child)
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_leaves_no_pool_behind_once_restarted() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let images = dir.path().join("disk-images");
    let mut worker = spawn_pool_worker(&coord.url(), dir.path(), "worker-1.log");
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w-pool"]).await;
    pool_filled(&images, 2).await;
    let s = client.create_session(&[]).await.expect("session").id;
    client
        .call(&s, "fs.write", json!({"path": "f", "content": "kept"}))
        .await
        .expect("write");
    let pool = pool_dir(&images).expect("pool dir");
    wait_for("the pool to refill", || {
        let pool = pool.clone();
        async move { (mounts_beneath(&pool).len() == 2).then_some(()) }
    })
    .await;
    let left = mounts_beneath(&pool);

    // kill -9: the pool's mounts and loop devices stay behind.
    worker.0.kill().expect("SIGKILL");
    worker.0.wait().expect("reaped");
    assert!(
        !mounts_beneath(&pool).is_empty(),
        "a killed worker cleans nothing"
    );

    let mut worker = spawn_pool_worker(&coord.url(), dir.path(), "worker-2.log");
    client.wait_ready(&["w-pool"]).await;
    let read = client
        .call(&s, "fs.read", json!({"path": "f"}))
        .await
        .expect("the session is adopted");
    assert_eq!(text_of(&read), "kept");
    pool_filled(&images, 2).await;
    let now = mounts_beneath(&pool);
    assert_eq!(now.len(), 2, "only the new pool is mounted: {now:?}");
    assert!(
        left.iter().all(|m| !now.contains(m)),
        "the old pool was deleted, not reused: {left:?} / {now:?}"
    );
    // Loop devices: the session's and the new pool's two; the killed worker's were freed.
    wait_for("the killed worker's loop devices to be freed", || async {
        (loops_under(dir.path()) == 3).then_some(())
    })
    .await;

    // SIGTERM: the pool is deleted and the session unmounted (its image stays for the next
    // start); nothing stays mounted or attached.
    worker.sigterm();
    let exit = tokio::task::spawn_blocking(move || worker.0.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "worker exited with {exit}");
    assert_eq!(mounts_beneath(dir.path()), Vec::<PathBuf>::new());
    assert!(!pool.exists(), "the pool's directory is gone");
    assert!(images.join(format!("{s}.img")).exists());
    wait_for("every loop device to be freed", || async {
        (loops_under(dir.path()) == 0).then_some(())
    })
    .await;
    coord.stop().await;
}
