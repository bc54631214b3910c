//! The file-system disk quota (HEIST_DISK_QUOTA=fs, worker as root as in CI): every session's
//! workspace is its own size-limited file system, so parallel writers and files written after
//! being unlinked cannot take more than the quota plus the documented slack; the session works
//! afterwards; closing leaves no mount and no image; a restarted worker mounts its sessions'
//! file systems again with their files.

use std::path::{Path, PathBuf};

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
}

/// Whether `path` is a mountpoint, per /proc/self/mountinfo.
fn mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().expect("utf-8")))
}

fn image(dir: &Path, session: &str) -> PathBuf {
    dir.join("disk-images").join(format!("{session}.img"))
}

struct Lab {
    dir: tempfile::TempDir,
    coord: Coordinator,
    worker: Worker,
    client: Client,
}

async fn lab() -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = start_worker(&coord, dir.path()).await;
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
    assert!(mounted(&ws), "{} is not its own file system", ws.display());
    let bound = QUOTA + diskfs::slack(QUOTA);

    // Four processes write 10 MiB each at once (each file is under RLIMIT_FSIZE; together 40
    // MiB against 16 MiB): the kernel stops them, and the exec says which quota.
    let writers = "import os
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
    let err = lab
        .client
        .call(&s, "run.python", json!({"code": writers, "timeout_s": 120}))
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
    assert!(!mounted(&ws), "a closed session's file system is unmounted");
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
    assert!(mounted(&keep_ws) && mounted(&gone_ws));
    let images = lab.images();
    assert!(image(images.parent().expect("parent"), &gone).exists());

    lab.client.close_session(&gone).await.expect("close");
    assert!(!mounted(&gone_ws), "no mount left");
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
    assert!(!mounted(&keep_ws), "a stopped worker leaves no mount");
    assert!(image(images.parent().expect("parent"), &keep).exists());
    let worker = start_worker(&coord, dir.path()).await;
    client.wait_ready(&["w1"]).await;
    let read = client
        .call(&keep, "fs.read", json!({"path": "f"}))
        .await
        .expect("re-adopted");
    assert_eq!(text_of(&read), "kept\n");
    assert!(mounted(&keep_ws), "mounted again before it was opened");
    let session = client.get_session(&keep).await.expect("get");
    assert_eq!(session.state, v1::SessionState::Ready as i32);

    client.close_session(&keep).await.expect("close");
    assert!(!mounted(&keep_ws));
    assert!(!image(images.parent().expect("parent"), &keep).exists());
    worker.stop().await;
    coord.stop().await;
}
