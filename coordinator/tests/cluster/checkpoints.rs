//! Checkpoints end to end: capture on one worker, restore in place, fork onto another worker,
//! incremental capture, a blob missing from the store, retention, auto-checkpoint, and a
//! coordinator restart.

use std::{
    collections::BTreeMap,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use heist_proto::{
    errors::reason,
    v1::{self, checkpoint_service_client::CheckpointServiceClient},
};
use serde_json::json;
use tonic::{Code, transport::Channel};

use crate::harness::{
    Client, Coordinator, Worker, WorkerOpts, assert_status, authed, channel, coordinator_config,
    text_of,
};

/// One path of a tree as the test compares it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File { mode: u32, content: Vec<u8> },
    Dir { mode: u32 },
    Symlink { target: PathBuf },
}

/// Every path under `root` (relative), with kind, mode and content or target.
fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("inside")
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                out.insert(rel, Node::Symlink { target });
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir { mode });
                walk(root, &path, out);
            } else {
                let content = std::fs::read(&path).expect("read");
                out.insert(rel, Node::File { mode, content });
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn write(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::write(&path, content).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Backdates a file's mtime so the stat cache may trust it (a file written within the last
/// few milliseconds is deliberately re-hashed).
fn backdate(path: &Path) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .expect("set mtime");
}

/// A workspace with every kind of entry: nested and empty directories, modes, an empty file,
/// duplicate contents, a multi-chunk file, and relative and absolute symlinks.
fn populate(root: &Path) {
    std::fs::create_dir_all(root.join("src/pkg")).expect("dirs");
    std::fs::create_dir_all(root.join("empty/nested-empty")).expect("dirs");
    std::fs::create_dir(root.join("locked")).expect("dir");
    write(root, "README.md", b"# plan\nvault at 3am\n", 0o644);
    write(root, "run.sh", b"#!/bin/sh\necho go\n", 0o755);
    write(root, "secret.key", b"k3y", 0o600);
    write(root, "empty.txt", b"", 0o644);
    write(root, "src/pkg/a.py", b"print('same')\n", 0o644);
    write(root, "src/pkg/b.py", b"print('same')\n", 0o640);
    let big: Vec<u8> = (0..3_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(root, "src/big.bin", &big, 0o644);
    write(root, "locked/inside.txt", b"read-only dir", 0o444);
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555))
        .expect("chmod dir");
    symlink("src/pkg/a.py", root.join("link-rel")).expect("symlink");
    symlink("/etc/hostname", root.join("link-abs")).expect("symlink");
    symlink("does/not/exist", root.join("src/dangling")).expect("symlink");
}

/// How many sessions the admin has, closed and failed ones included.
async fn sessions_count(client: &mut Client) -> usize {
    let msg = v1::ListSessionsRequest {
        page_size: 1000,
        page_token: String::new(),
        include_closed: true,
    };
    client
        .sessions
        .list_sessions(authed(&client.token, msg))
        .await
        .expect("list sessions")
        .into_inner()
        .sessions
        .len()
}

struct Cluster {
    _dir: crate::harness::Scratch,
    data_dir: PathBuf,
    coordinator: Coordinator,
    workers: Vec<Worker>,
    client: Client,
    checkpoints: CheckpointServiceClient<Channel>,
}

impl Cluster {
    async fn start(workers: usize, tune: impl FnOnce(&mut heist_coordinator::Config)) -> Self {
        Self::start_with(workers, tune, None).await
    }

    async fn start_with(
        workers: usize,
        tune: impl FnOnce(&mut heist_coordinator::Config),
        worker_config: Option<fn(&mut heist_worker::Config)>,
    ) -> Self {
        let dir = crate::harness::tempdir();
        let data_dir = dir.path().join("coordinator");
        let mut config = coordinator_config(&data_dir);
        tune(&mut config);
        let coordinator = Coordinator::start(config).await;
        let mut started = Vec::new();
        for i in 1..=workers {
            let id = format!("w{i}");
            let mut opts = WorkerOpts::new(&id).label("w", &i.to_string());
            if let Some(configure) = worker_config {
                opts = opts.configure(configure);
            }
            started
                .push(Worker::start(&coordinator.url(), &dir.path().join("workers"), opts).await);
        }
        let mut client = Client::admin(&coordinator.url()).await;
        let ids: Vec<String> = (1..=workers).map(|i| format!("w{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        client.wait_ready(&ids).await;
        let checkpoints = CheckpointServiceClient::new(channel(&coordinator.url()).await);
        Self {
            _dir: dir,
            data_dir,
            coordinator,
            workers: started,
            client,
            checkpoints,
        }
    }

    fn worker(&self, id: &str) -> &Worker {
        self.workers.iter().find(|w| w.id == id).expect("worker")
    }

    fn workspace(&self, session: &v1::Session) -> PathBuf {
        self.worker(&session.worker_id).workspace(&session.id)
    }

    async fn session_on(&mut self, worker: &str) -> v1::Session {
        let session = self
            .client
            .create_session(&[("w", worker)])
            .await
            .expect("session");
        assert_eq!(session.worker_id, format!("w{worker}"));
        session
    }

    async fn create(&mut self, session: &str) -> Result<v1::Checkpoint, tonic::Status> {
        self.create_labelled(session, &[]).await
    }

    async fn create_labelled(
        &mut self,
        session: &str,
        labels: &[(&str, &str)],
    ) -> Result<v1::Checkpoint, tonic::Status> {
        let msg = v1::CreateCheckpointRequest {
            session_id: session.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            request_id: String::new(),
        };
        self.checkpoints
            .create_checkpoint(authed(&self.client.token, msg))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn restore(&mut self, id: &str, session: &str) -> Result<v1::Session, tonic::Status> {
        let msg = v1::RestoreCheckpointRequest {
            checkpoint_id: id.to_owned(),
            session_id: session.to_owned(),
            request_id: String::new(),
        };
        self.checkpoints
            .restore_checkpoint(authed(&self.client.token, msg))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn fork(
        &mut self,
        id: &str,
        labels: &[(&str, &str)],
    ) -> Result<v1::Session, tonic::Status> {
        let msg = v1::ForkSessionRequest {
            checkpoint_id: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            request_id: String::new(),
        };
        self.checkpoints
            .fork_session(authed(&self.client.token, msg))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn get(&mut self, id: &str, manifest: bool) -> Result<v1::Checkpoint, tonic::Status> {
        let msg = v1::GetCheckpointRequest {
            checkpoint_id: id.to_owned(),
            include_manifest: manifest,
        };
        self.checkpoints
            .get_checkpoint(authed(&self.client.token, msg))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn list(&mut self, session: &str) -> Vec<v1::Checkpoint> {
        let msg = v1::ListCheckpointsRequest {
            session_id: session.to_owned(),
            page_size: 0,
            page_token: String::new(),
        };
        self.checkpoints
            .list_checkpoints(authed(&self.client.token, msg))
            .await
            .expect("list")
            .into_inner()
            .checkpoints
    }

    async fn delete(&mut self, id: &str) -> Result<v1::DeleteCheckpointResponse, tonic::Status> {
        let msg = v1::DeleteCheckpointRequest {
            checkpoint_id: id.to_owned(),
            request_id: String::new(),
        };
        self.checkpoints
            .delete_checkpoint(authed(&self.client.token, msg))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn stop(self) {
        for w in self.workers {
            w.stop().await;
        }
        self.coordinator.stop().await;
    }
}

#[tokio::test]
async fn checkpoint_taken_on_worker_1_restores_in_place_and_forks_onto_worker_2() {
    let mut c = Cluster::start(2, |_| {}).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    populate(&ws);
    let original = tree(&ws);

    let cp = c.create(&session.id).await.expect("checkpoint");
    assert!(cp.id.starts_with("c-"), "{}", cp.id);
    assert_eq!(cp.session_id, session.id);
    assert_eq!(cp.worker_id, "w1");
    assert_eq!(cp.parent_id, "");
    assert_eq!(cp.file_count, 8);
    let stats = cp.stats.expect("stats");
    assert_eq!(stats.uploaded_blobs, 7, "two files share one blob");

    // Change everything: content, modes, deletions, new files and directories.
    write(&ws, "README.md", b"# plan\nvault at NOON\n", 0o644);
    std::fs::set_permissions(ws.join("run.sh"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::remove_file(ws.join("secret.key")).expect("rm");
    std::fs::remove_dir_all(ws.join("empty")).expect("rm dir");
    std::fs::remove_file(ws.join("link-rel")).expect("rm link");
    std::fs::create_dir(ws.join("new-dir")).expect("mkdir");
    write(&ws, "new-dir/created-later.txt", b"should vanish", 0o644);
    write(&ws, "created-later.txt", b"should vanish too", 0o644);
    assert_ne!(tree(&ws), original);

    // Restore in place: back to the checkpoint exactly, later files gone.
    let restored = c.restore(&cp.id, "").await.expect("restore");
    assert_eq!(restored.id, session.id);
    assert_eq!(tree(&ws), original);
    // Tools see the restored tree (the worker reopened the workspace).
    let read = c
        .client
        .call(&session.id, "fs.read", json!({"path": "README.md"}))
        .await
        .expect("read");
    assert_eq!(text_of(&read), "# plan\nvault at 3am\n");

    // Fork onto worker 2 (forced by labels): identical content on the other machine.
    let fork = c.fork(&cp.id, &[("w", "2")]).await.expect("fork");
    assert_eq!(fork.worker_id, "w2");
    assert_eq!(fork.state, v1::SessionState::Ready as i32);
    assert_ne!(fork.id, session.id);
    assert_eq!(tree(&c.workspace(&fork)), original);

    // Without a selector the fork goes to a worker that already holds the blobs.
    let warm = c.fork(&cp.id, &[]).await.expect("fork");
    assert!(["w1", "w2"].contains(&warm.worker_id.as_str()));
    assert_eq!(tree(&c.workspace(&warm)), original);

    // The fork's first checkpoint descends from the checkpoint it came from.
    let child = c.create(&fork.id).await.expect("checkpoint of the fork");
    assert_eq!(child.parent_id, cp.id);
    assert_eq!(child.worker_id, "w2");
    let full = c.get(&child.id, true).await.expect("get");
    let manifest = full.manifest.expect("manifest");
    let link = manifest
        .entries
        .iter()
        .find(|e| e.path == "link-abs")
        .expect("symlink entry");
    assert_eq!(link.kind, v1::EntryKind::Symlink as i32);
    assert_eq!(link.symlink_target, "/etc/hostname");
    assert!(
        c.get(&child.id, false)
            .await
            .expect("get")
            .manifest
            .is_none()
    );

    // Unlock the read-only directory so the temp dir can be removed.
    for root in [ws, c.workspace(&fork), c.workspace(&warm)] {
        let _ =
            std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755));
    }
    c.stop().await;
}

#[tokio::test]
async fn second_capture_hashes_and_uploads_only_the_changed_file() {
    let mut c = Cluster::start(1, |_| {}).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    for i in 0..40 {
        let path = ws.join(format!("f{i:02}.txt"));
        std::fs::write(&path, format!("file {i}\n").repeat(100)).expect("write");
        backdate(&path);
    }
    let first = c.create(&session.id).await.expect("first");
    let s1 = first.stats.expect("stats");
    assert_eq!((s1.files, s1.hashed_files, s1.uploaded_blobs), (40, 40, 40));

    std::fs::write(ws.join("f07.txt"), "changed\n".repeat(100)).expect("change");
    let second = c.create(&session.id).await.expect("second");
    let s2 = second.stats.expect("stats");
    assert_eq!(s2.files, 40);
    assert_eq!(s2.hashed_files, 1, "only the changed file is read again");
    assert_eq!(s2.uploaded_blobs, 1, "only its new content is uploaded");
    assert_eq!(s2.uploaded_bytes, 800);
    assert_eq!(second.parent_id, first.id);

    let listed = c.list(&session.id).await;
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [second.id.as_str(), first.id.as_str()], "newest first");
    c.stop().await;
}

#[tokio::test]
async fn a_blob_missing_from_the_store_fails_restore_and_fork_and_changes_nothing() {
    let mut c = Cluster::start(2, |_| {}).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    write(&ws, "keep.txt", b"still here", 0o644);
    write(&ws, "doomed.txt", b"this blob will vanish", 0o644);
    let cp = c.create(&session.id).await.expect("checkpoint");

    let hash = blake3::hash(b"this blob will vanish").to_hex().to_string();
    let blob = c.data_dir.join("blobs").join(&hash[..2]).join(&hash);
    std::fs::remove_file(&blob).expect("delete the blob from the store");

    write(&ws, "keep.txt", b"changed after the checkpoint", 0o644);
    write(&ws, "new.txt", b"new", 0o644);
    let before = tree(&ws);

    let err = c.restore(&cp.id, "").await.expect_err("blob missing");
    assert_status(&err, Code::FailedPrecondition, reason::BLOB_MISSING);
    assert_eq!(
        heist_proto::errors::metadata_of(&err, "hash").as_deref(),
        Some(hash.as_str())
    );
    assert_eq!(tree(&ws), before, "nothing half-restored");
    let ready = c.client.get_session(&session.id).await.expect("session");
    assert_eq!(ready.state, v1::SessionState::Ready as i32);

    let sessions_before = sessions_count(&mut c.client).await;
    let err = c
        .fork(&cp.id, &[("w", "2")])
        .await
        .expect_err("blob missing");
    assert_status(&err, Code::FailedPrecondition, reason::BLOB_MISSING);
    assert_eq!(
        sessions_count(&mut c.client).await,
        sessions_before,
        "no session created"
    );
    c.stop().await;
}

#[tokio::test]
async fn retention_keeps_the_parent_chain_and_delete_refuses_parents() {
    let mut c = Cluster::start(1, |config| config.checkpoint_max_per_session = 3).await;
    let a = c.session_on("1").await;
    let ws = c.workspace(&a);
    let mut ids = Vec::new();
    for i in 1..=2 {
        write(&ws, "state.txt", format!("version {i}").as_bytes(), 0o644);
        ids.push(c.create(&a.id).await.expect("checkpoint").id);
    }
    // c1 becomes a fork point: the fork's checkpoint names it as parent.
    let fork = c.fork(&ids[0], &[]).await.expect("fork");
    let n1 = c.create(&fork.id).await.expect("fork checkpoint");
    assert_eq!(n1.parent_id, ids[0]);
    for i in 3..=5 {
        write(&ws, "state.txt", format!("version {i}").as_bytes(), 0o644);
        ids.push(c.create(&a.id).await.expect("checkpoint").id);
    }

    // Max 3 per session: c2 is gone; c1 stays (a fork point), c3..c5 stay.
    let listed: Vec<String> = c.list(&a.id).await.into_iter().map(|c| c.id).collect();
    assert_eq!(
        listed,
        [
            ids[4].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[0].clone()
        ]
    );
    let err = c.get(&ids[1], false).await.expect_err("removed");
    assert_status(&err, Code::NotFound, reason::CHECKPOINT_NOT_FOUND);
    // Every retained checkpoint's chain is complete.
    let mut cursor = ids[4].clone();
    let mut chain = Vec::new();
    while !cursor.is_empty() {
        chain.push(cursor.clone());
        cursor = c
            .get(&cursor, false)
            .await
            .expect("ancestor exists")
            .parent_id;
    }
    assert_eq!(
        chain,
        [
            ids[4].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[0].clone()
        ]
    );
    // c2's content (version 2) was only in c2: its blob is freed; the fork point still restores.
    let v2 = blake3::hash(b"version 2").to_hex().to_string();
    assert!(!c.data_dir.join("blobs").join(&v2[..2]).join(&v2).exists());
    c.restore(&ids[0], "")
        .await
        .expect("restore the fork point");
    assert_eq!(
        std::fs::read(ws.join("state.txt")).expect("read"),
        b"version 1"
    );

    // Explicit delete refuses a parent, frees a leaf's unshared blobs.
    let err = c.delete(&ids[0]).await.expect_err("has children");
    assert_status(
        &err,
        Code::FailedPrecondition,
        reason::CHECKPOINT_HAS_CHILDREN,
    );
    let freed = c.delete(&n1.id).await.expect("delete a leaf");
    assert_eq!(freed.freed_blobs, 0, "n1 shares its only blob with c1");
    let err = c.delete(&n1.id).await.expect_err("gone");
    assert_status(&err, Code::NotFound, reason::CHECKPOINT_NOT_FOUND);
    c.stop().await;
}

#[tokio::test]
async fn auto_checkpoint_follows_mutating_tool_calls_only() {
    let mut c = Cluster::start(1, |config| config.auto_checkpoint = true).await;
    let session = c.session_on("1").await;
    c.client
        .call(
            &session.id,
            "fs.write",
            json!({"path": "a.txt", "content": "one"}),
        )
        .await
        .expect("write");
    c.client
        .call(&session.id, "fs.read", json!({"path": "a.txt"}))
        .await
        .expect("read");
    let listed = c.list(&session.id).await;
    assert_eq!(listed.len(), 1, "one mutating call, one checkpoint");
    assert_eq!(
        listed[0].labels.get("heist.auto").map(String::as_str),
        Some("true")
    );
    assert_eq!(listed[0].file_count, 1);
    c.stop().await;
}

#[tokio::test]
async fn checkpoints_survive_a_coordinator_restart() {
    let mut c = Cluster::start(1, |_| {}).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    write(&ws, "plan.txt", b"before the restart", 0o644);
    let labelled = c
        .create_labelled(&session.id, &[("stage", "recon")])
        .await
        .expect("checkpoint");

    let addr = c.coordinator.addr;
    let config = coordinator_config(&c.data_dir);
    let Cluster {
        _dir,
        data_dir,
        coordinator,
        workers,
        ..
    } = c;
    coordinator.stop().await;
    let coordinator = Coordinator::start_on(&addr.to_string(), config).await;
    let mut client = Client::admin(&coordinator.url()).await;
    client.wait_ready(&["w1"]).await;
    let checkpoints = CheckpointServiceClient::new(channel(&coordinator.url()).await);
    let mut c = Cluster {
        _dir,
        data_dir,
        coordinator,
        workers,
        client,
        checkpoints,
    };

    let got = c.get(&labelled.id, true).await.expect("still there");
    assert_eq!(got.labels.get("stage").map(String::as_str), Some("recon"));
    assert_eq!(got.manifest.expect("manifest").entries.len(), 1);
    write(&ws, "plan.txt", b"after the restart", 0o644);
    c.restore(&labelled.id, "")
        .await
        .expect("restore after restart");
    assert_eq!(
        std::fs::read(ws.join("plan.txt")).expect("read"),
        b"before the restart"
    );
    let next = c.create(&session.id).await.expect("checkpoint");
    assert_eq!(next.parent_id, labelled.id, "lineage survived the restart");
    c.stop().await;
}

fn disk_fs(config: &mut heist_worker::Config) {
    config.disk_quota = heist_worker::diskfs::DiskQuotaMode::Fs;
    config.quotas.disk_bytes = 32 << 20;
}

#[tokio::test]
async fn restore_and_fork_work_when_each_workspace_is_its_own_file_system() {
    let mut c = Cluster::start_with(2, |_| {}, Some(disk_fs)).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    assert!(
        crate::harness::is_mount_point(&ws),
        "{} is not its own file system",
        ws.display()
    );
    populate(&ws);
    let original = tree(&ws);
    let cp = c.create(&session.id).await.expect("checkpoint");
    assert_eq!(
        cp.file_count, 8,
        "nothing of the file system itself is captured"
    );

    write(&ws, "README.md", b"# plan\nvault at NOON\n", 0o644);
    std::fs::remove_dir_all(ws.join("empty")).expect("rm dir");
    write(&ws, "created-later.txt", b"should vanish", 0o644);
    assert_ne!(tree(&ws), original);

    // In place: the mountpoint stays, its contents are swapped, nothing is left aside.
    c.restore(&cp.id, "").await.expect("restore");
    assert_eq!(tree(&ws), original);
    assert!(crate::harness::is_mount_point(&ws));
    let read = c
        .client
        .call(&session.id, "fs.read", json!({"path": "README.md"}))
        .await
        .expect("read");
    assert_eq!(text_of(&read), "# plan\nvault at 3am\n");
    let left: Vec<_> = std::fs::read_dir(&ws)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().starts_with(".heist-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The quota still holds after the restore.
    let err = c
        .client
        .call(
            &session.id,
            "exec",
            json!({"command": "head -c 100000000 /dev/zero > big"}),
        )
        .await
        .expect_err("over the quota");
    assert_status(&err, Code::ResourceExhausted, reason::LIMIT_EXCEEDED);

    // Fork onto worker 2: a new session, its own file system, the same tree.
    let fork = c.fork(&cp.id, &[("w", "2")]).await.expect("fork");
    assert_eq!(fork.worker_id, "w2");
    let forked = c.workspace(&fork);
    assert!(crate::harness::is_mount_point(&forked));
    assert_eq!(tree(&forked), original);
    c.client.close_session(&fork.id).await.expect("close");
    c.client.close_session(&session.id).await.expect("close");
    assert!(!crate::harness::is_mount_point(&forked) && !crate::harness::is_mount_point(&ws));
    c.stop().await;
}

/// Restarts the cluster's coordinator on the same address and data directory.
async fn restart_coordinator(
    c: Cluster,
    tune: impl FnOnce(&mut heist_coordinator::Config),
) -> Cluster {
    let addr = c.coordinator.addr;
    let mut config = coordinator_config(&c.data_dir);
    tune(&mut config);
    let Cluster {
        _dir,
        data_dir,
        coordinator,
        workers,
        ..
    } = c;
    coordinator.stop().await;
    let coordinator = Coordinator::start_on(&addr.to_string(), config).await;
    let mut client = Client::admin(&coordinator.url()).await;
    let ids: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    client.wait_ready(&ids).await;
    let checkpoints = CheckpointServiceClient::new(channel(&coordinator.url()).await);
    Cluster {
        _dir,
        data_dir,
        coordinator,
        workers,
        client,
        checkpoints,
    }
}

fn sent(cp: &v1::Checkpoint) -> u64 {
    cp.stats.as_ref().expect("stats").sent_entries
}

#[tokio::test]
async fn delta_checkpoints_restore_exactly_elsewhere_after_their_parent_goes_and_a_restart() {
    let tune = |config: &mut heist_coordinator::Config| config.checkpoint_max_per_session = 2;
    let mut c = Cluster::start(2, tune).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    populate(&ws);
    let first = c.create(&session.id).await.expect("first");
    assert_eq!(
        sent(&first),
        tree(&ws).len() as u64,
        "the first capture is whole"
    );

    // A file changed, one removed, a directory removed with its contents, one added: only
    // those travel.
    write(&ws, "README.md", b"# plan\nvault at NOON\n", 0o644);
    std::fs::remove_file(ws.join("secret.key")).expect("rm");
    std::fs::remove_dir_all(ws.join("empty")).expect("rm dir");
    write(&ws, "notes.txt", b"new", 0o644);
    let second = c.create(&session.id).await.expect("second");
    assert_eq!(second.parent_id, first.id);
    assert_eq!(sent(&second), 5, "2 changed or added, 3 removed");
    let second_tree = tree(&ws);

    // The added file removed again, a removed one back with new content.
    std::fs::remove_file(ws.join("notes.txt")).expect("rm");
    write(&ws, "secret.key", b"n3w k3y", 0o600);
    let third = c.create(&session.id).await.expect("third");
    assert_eq!(third.parent_id, second.id);
    assert_eq!(sent(&third), 2);
    let third_tree = tree(&ws);
    assert!(!third_tree.contains_key("notes.txt"));

    // Retention (2 per session) removed the first checkpoint, the base of the others.
    let err = c.get(&first.id, false).await.expect_err("removed");
    assert_status(&err, Code::NotFound, reason::CHECKPOINT_NOT_FOUND);
    assert_eq!(c.get(&second.id, false).await.expect("kept").parent_id, "");

    // Both restore exactly on the other worker, which holds none of their blobs.
    let f3 = c.fork(&third.id, &[("w", "2")]).await.expect("fork third");
    assert_eq!(f3.worker_id, "w2");
    assert_eq!(tree(&c.workspace(&f3)), third_tree);
    assert!(
        !c.workspace(&f3).join("notes.txt").exists(),
        "a removed file stays removed"
    );
    let f2 = c
        .fork(&second.id, &[("w", "2")])
        .await
        .expect("fork second");
    assert_eq!(tree(&c.workspace(&f2)), second_tree);
    let manifest = c
        .get(&third.id, true)
        .await
        .expect("get")
        .manifest
        .expect("manifest");
    assert_eq!(manifest.entries.len(), third_tree.len(), "the whole tree");

    let mut c = restart_coordinator(c, tune).await;
    let again = c
        .fork(&third.id, &[("w", "2")])
        .await
        .expect("fork after restart");
    assert_eq!(tree(&c.workspace(&again)), third_tree);

    // The worker still remembers the head's tree: the next capture is a delta against it.
    write(&ws, "README.md", b"after the restart", 0o644);
    let fourth = c.create(&session.id).await.expect("fourth");
    assert_eq!(fourth.parent_id, third.id);
    assert_eq!(sent(&fourth), 1);
    let fourth_tree = tree(&ws);
    let f4 = c
        .fork(&fourth.id, &[("w", "2")])
        .await
        .expect("fork fourth");
    assert_eq!(tree(&c.workspace(&f4)), fourth_tree);

    // A checkpoint taken right after a restore is a delta against the restored one.
    c.restore(&second.id, "").await.expect("restore");
    assert_eq!(tree(&ws), second_tree);
    let fifth = c.create(&session.id).await.expect("fifth");
    assert_eq!(fifth.parent_id, second.id);
    assert_eq!(sent(&fifth), 0, "nothing changed since the restore");
    let f5 = c.fork(&fifth.id, &[("w", "2")]).await.expect("fork fifth");
    assert_eq!(tree(&c.workspace(&f5)), second_tree);

    for session in [&session, &f3, &f2, &again, &f4, &f5] {
        let root = c.workspace(session);
        let _ =
            std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755));
    }
    c.stop().await;
}

fn examined(cp: &v1::Checkpoint) -> u64 {
    cp.stats.as_ref().expect("stats").examined_entries
}

/// A change made to a workspace between two checkpoints.
type Change = fn(&Path);

/// Where each workspace is a file system of its own, a capture after a few changes examines
/// only what the workspace's change journal named, and misses nothing: after every kind of
/// change, the checkpoint forked onto the other worker is exactly the live tree.
#[tokio::test]
async fn captures_examine_only_what_the_journal_names_and_miss_nothing() {
    let mut c = Cluster::start_with(2, |_| {}, Some(disk_fs)).await;
    let session = c.session_on("1").await;
    let ws = c.workspace(&session);
    populate(&ws);
    for d in 0..10 {
        std::fs::create_dir_all(ws.join(format!("many/d{d}"))).expect("dir");
        for f in 0..30 {
            write(
                &ws,
                &format!("many/d{d}/f{f}.txt"),
                format!("{d}/{f}\n").as_bytes(),
                0o644,
            );
        }
    }
    // Files written within a few milliseconds of a capture are examined again by the next one
    // (their stat cannot vouch for them yet): let the clock move on before each capture.
    let settle = || tokio::time::sleep(Duration::from_millis(60));
    settle().await;
    let mut last = c.create(&session.id).await.expect("first");
    let whole = examined(&last);
    assert!(whole > 300, "the first capture walks the tree: {whole}");

    let changes: [(&str, Change, Option<u64>); 9] = [
        ("nothing", |_| {}, Some(0)),
        (
            "content and modes",
            |ws| {
                write(ws, "many/d3/f7.txt", b"3/X\n", 0o644);
                std::fs::set_permissions(
                    ws.join("many/d4/f1.txt"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .expect("chmod");
                std::fs::set_permissions(
                    ws.join("many/d5"),
                    std::fs::Permissions::from_mode(0o700),
                )
                .expect("chmod dir");
            },
            Some(3),
        ),
        (
            "a new subtree and a symlink",
            |ws| {
                std::fs::create_dir_all(ws.join("new/a/b")).expect("dirs");
                write(ws, "new/a/b/deep.txt", b"deep", 0o644);
                write(ws, "new/top.txt", b"top", 0o600);
                symlink("../README.md", ws.join("new/readme")).expect("symlink");
            },
            Some(6),
        ),
        (
            "a directory moved away and another made in its place",
            |ws| {
                std::fs::create_dir(ws.join("moved")).expect("dir");
                std::fs::rename(ws.join("many/d1"), ws.join("moved/d1")).expect("mv");
                std::fs::create_dir(ws.join("many/d1")).expect("dir");
                write(ws, "many/d1/other.txt", b"other", 0o644);
            },
            Some(36),
        ),
        (
            "removals and kinds swapped",
            |ws| {
                std::fs::remove_dir_all(ws.join("many/d2")).expect("rm -r");
                std::fs::remove_file(ws.join("many/d6/f0.txt")).expect("rm");
                std::fs::create_dir(ws.join("many/d6/f0.txt")).expect("dir over file");
                write(ws, "many/d6/f0.txt/in.txt", b"in", 0o644);
                std::fs::remove_dir(ws.join("empty/nested-empty")).expect("rmdir");
                write(ws, "empty/nested-empty", b"now a file", 0o644);
                std::fs::rename(ws.join("many/d8/f2.txt"), ws.join("many/d9/f3.txt")).expect("mv");
            },
            Some(8),
        ),
        (
            "a hard link appears",
            |ws| std::fs::hard_link(ws.join("many/d7/f1.txt"), ws.join("linked.txt")).expect("ln"),
            None,
        ),
        (
            "a write through one of the links",
            |ws| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(ws.join("many/d7/f1.txt"))
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"more\n"))
                    .expect("append");
            },
            Some(2),
        ),
        (
            "more changes than the journal keeps (4,096 entries)",
            |ws| {
                for i in 0..4200 {
                    std::fs::write(ws.join(format!("many/d0/n{i}")), b"n").expect("write");
                }
            },
            None,
        ),
        (
            "a file truncated in place (the two linked paths are examined every time now)",
            |ws| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(ws.join("many/d0/f0.txt"))
                    .expect("open");
                f.set_len(1).expect("truncate");
            },
            Some(3),
        ),
    ];
    for (what, change, most) in changes {
        change(&ws);
        settle().await;
        let cp = c.create(&session.id).await.expect(what);
        assert_eq!(cp.parent_id, last.id, "{what}");
        match most {
            Some(most) => assert!(
                examined(&cp) <= most,
                "{what}: examined {} entries, expected at most {most}",
                examined(&cp)
            ),
            None => assert!(examined(&cp) > 300, "{what}: the capture walks"),
        }
        let fork = c.fork(&cp.id, &[("w", "2")]).await.expect("fork");
        assert_eq!(tree(&c.workspace(&fork)), tree(&ws), "{what}");
        c.client.close_session(&fork.id).await.expect("close");
        last = cp;
    }
    c.stop().await;
}
