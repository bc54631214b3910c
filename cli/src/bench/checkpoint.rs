//! Checkpoints against `tar -cf` and `cp -a` of the same tree, in one run.
//!
//! Starts its own local cluster with two workers (labels `w=1`, `w=2`), writes a generated tree
//! (10,000 files / 200 MiB; `--quick`: 300 files / 3 MiB) straight into a session's workspace
//! on worker 1, then measures, each from a clean page-cache-warm state (`sync` before every
//! step, and background blob-cache fills allowed to finish):
//!
//! - `tar -cf` and `cp -a` of the tree (median of 3);
//! - the first capture (everything hashed and uploaded, made durable at the coordinator);
//! - a capture after one file changed (median of five rounds, each a delta against the last);
//! - a restore of the first checkpoint into a session on worker 2 (cold: every blob fetched);
//! - a restore in place on worker 1 (warm: from its cache and unchanged files).
//!
//! Times are what the client sees for the RPC. Captures include the coordinator's fsync of the
//! uploaded blobs; `tar` and `cp` only write to the page cache.
//!
//! Nothing is deleted between steps (the baseline outputs stay until the end): on ext4,
//! creating files soon after thousands were deleted is several times slower (the inode
//! allocator skips recently deleted inodes), which would distort whichever step came next.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;

use super::{
    failed,
    phases::{Lab, Phase},
    progress,
    report::Metric,
};
use crate::{
    cluster::{LocalCluster, Options},
    error::Error,
};

/// How long one checkpoint call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Rounds of "change one file, capture" whose median is reported.
const ONE_CHANGE_ROUNDS: usize = 5;
/// How long background cache fills get to settle before the next step.
const SETTLE_CAP: Duration = Duration::from_secs(60);

/// The checkpoint phase.
pub struct Checkpoints;

/// Size of the generated tree.
#[derive(Clone, Copy, Debug)]
struct TreeSize {
    files: u64,
    bytes: u64,
    dirs: u64,
}

impl TreeSize {
    fn for_run(quick: bool) -> Self {
        if quick {
            Self {
                files: 300,
                bytes: 3 << 20,
                dirs: 10,
            }
        } else {
            Self {
                files: 10_000,
                bytes: 200 << 20,
                dirs: 100,
            }
        }
    }
}

impl Phase for Checkpoints {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn title(&self) -> &'static str {
        "checkpoint capture/restore vs tar -cf and cp -a of the same tree (2 workers)"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let size = TreeSize::for_run(lab.settings.quick);
            let data_dir = std::env::temp_dir().join(format!(
                "heist-bench-checkpoint-{}",
                uuid::Uuid::new_v4().simple()
            ));
            progress("checkpoint: starting a local cluster (1 coordinator, 2 workers)");
            let cluster = LocalCluster::start(Options {
                workers: 2,
                port: 0,
                data_dir: Some(data_dir.clone()),
                worker_labels: vec!["w=1".to_owned(), "w=2".to_owned()],
                bin_dir: lab.bin_dir.clone(),
                log_level: lab.cluster_log_level.clone(),
                call_timeout: CALL_TIMEOUT,
                ..Options::default()
            })
            .await?;
            let measured = measure(&cluster, &data_dir, size).await;
            let stopped = cluster.stop().await;
            if measured.is_ok()
                && let Err(err) = std::fs::remove_dir_all(&data_dir)
            {
                tracing::warn!(%err, dir = %data_dir.display(), "cannot remove the bench data directory");
            }
            stopped?;
            measured
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn measure(
    cluster: &LocalCluster,
    data_dir: &Path,
    size: TreeSize,
) -> Result<Vec<Metric>, Error> {
    let client = cluster.client().await?;
    let labels = |w: &str| [("w".to_owned(), w.to_owned())].into_iter().collect();
    let s1 = client.create_session(labels("1"), &rid()).await?;
    let s2 = client.create_session(labels("2"), &rid()).await?;
    let ws = data_dir.join("worker-1/workspaces").join(&s1.id);
    if !ws.is_dir() {
        return Err(failed(format!("workspace {} not found", ws.display())));
    }
    progress(&format!(
        "checkpoint: writing {} files ({} MiB) into {}",
        size.files,
        size.bytes >> 20,
        ws.display()
    ));
    let tree = ws.clone();
    tokio::task::spawn_blocking(move || generate(&tree, size))
        .await
        .map_err(|e| failed(format!("tree generation failed: {e}")))??;
    settle(data_dir).await;

    let scratch = data_dir.join("baseline");
    std::fs::create_dir_all(&scratch)
        .map_err(|e| failed(format!("cannot create {}: {e}", scratch.display())))?;
    let tar_ms = median3(|run| baseline_tar(&ws, &scratch.join(format!("tree-{run}.tar")))).await?;
    let cp_ms = median3(|run| baseline_cp(&ws, &scratch.join(format!("copy-{run}")))).await?;
    progress(&format!(
        "checkpoint: tar -cf {tar_ms:.0} ms, cp -a {cp_ms:.0} ms"
    ));

    let (first, full_ms) =
        timed(client.create_checkpoint(&s1.id, Default::default(), &rid())).await?;
    let stats = first.stats.unwrap_or_default();
    if stats.files != size.files || stats.uploaded_blobs == 0 {
        return Err(failed(format!(
            "first capture recorded {} files and uploaded {} blobs; expected {} files",
            stats.files, stats.uploaded_blobs, size.files
        )));
    }
    progress(&format!("checkpoint: first capture {full_ms:.0} ms"));
    settle(data_dir).await;

    // Median of several rounds: one change, then a capture (each a delta against the last).
    let mut one_times = Vec::with_capacity(ONE_CHANGE_ROUNDS);
    let mut one_worker_times = Vec::with_capacity(ONE_CHANGE_ROUNDS);
    let mut stats2 = Default::default();
    for _ in 0..ONE_CHANGE_ROUNDS {
        change_one_file(&ws)?;
        settle(data_dir).await;
        let (second, one_ms) =
            timed(client.create_checkpoint(&s1.id, Default::default(), &rid())).await?;
        stats2 = second.stats.unwrap_or_default();
        one_worker_times.push(ms(Duration::from_micros(stats2.duration_us)));
        if stats2.uploaded_blobs != 1 {
            return Err(failed(format!(
                "capture after one change uploaded {} blobs, expected 1",
                stats2.uploaded_blobs
            )));
        }
        one_times.push(one_ms);
    }
    one_times.sort_by(f64::total_cmp);
    let one_ms = one_times[one_times.len() / 2];
    one_worker_times.sort_by(f64::total_cmp);
    let one_worker_ms = one_worker_times[one_worker_times.len() / 2];
    progress(&format!(
        "checkpoint: capture after one change {one_ms:.1} ms (median of {ONE_CHANGE_ROUNDS}; \
         hashed {} files, sent {} manifest entries)",
        stats2.hashed_files, stats2.sent_entries
    ));
    settle(data_dir).await;

    let (_, restore_other_ms) =
        timed(client.restore_checkpoint(&first.id, Some(&s2.id), &rid())).await?;
    verify_restored(&data_dir.join("worker-2/workspaces").join(&s2.id), size)?;
    progress(&format!(
        "checkpoint: restore on the other worker {restore_other_ms:.0} ms"
    ));
    settle(data_dir).await;

    let (_, restore_here_ms) = timed(client.restore_checkpoint(&first.id, None, &rid())).await?;
    progress(&format!(
        "checkpoint: restore in place {restore_here_ms:.0} ms"
    ));
    settle(data_dir).await;

    let mut metrics = vec![
        Metric::new("files", "files in the tree", count(size.files), "files"),
        Metric::new("mib", "size of the tree", count(size.bytes >> 20), "MiB"),
        Metric::new("tar_ms", "tar -cf (median of 3)", tar_ms, "ms"),
        Metric::new("cp_ms", "cp -a (median of 3)", cp_ms, "ms"),
        Metric::new("capture_full_ms", "first capture", full_ms, "ms"),
        Metric::new(
            "capture_one_ms",
            "capture after 1 file changed",
            one_ms,
            "ms",
        ),
        Metric::new(
            "capture_one_worker_ms",
            "capture after 1 file changed, worker side",
            one_worker_ms,
            "ms",
        ),
        Metric::new(
            "capture_one_hashed_files",
            "files hashed after 1 change",
            count(stats2.hashed_files),
            "files",
        ),
        Metric::new(
            "capture_one_sent_entries",
            "manifest entries sent after 1 change",
            count(stats2.sent_entries),
            "entries",
        ),
        Metric::new(
            "restore_other_ms",
            "restore on the other worker (cold)",
            restore_other_ms,
            "ms",
        ),
        Metric::new(
            "restore_in_place_ms",
            "restore in place (warm)",
            restore_here_ms,
            "ms",
        ),
        Metric::new(
            "capture_worker_full_ms",
            "first capture, worker side",
            ms(Duration::from_micros(stats.duration_us)),
            "ms",
        ),
    ];
    metrics.retain(|m| m.value.is_finite());
    Ok(metrics)
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[allow(clippy::cast_precision_loss)]
fn count(n: u64) -> f64 {
    n as f64
}

async fn timed<T>(call: impl Future<Output = Result<T, Error>>) -> Result<(T, f64), Error> {
    let started = Instant::now();
    let out = call.await?;
    Ok((out, ms(started.elapsed())))
}

/// Flushes dirty pages, then waits until the workers' blob caches stop growing (their
/// background fills would otherwise compete with the next measurement).
async fn settle(data_dir: &Path) {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    let caches: Vec<PathBuf> = (1..=2)
        .map(|i| data_dir.join(format!("worker-{i}/blobs")))
        .collect();
    let deadline = Instant::now() + SETTLE_CAP;
    let mut last = None;
    while Instant::now() < deadline {
        let dirs = caches.clone();
        let now =
            tokio::task::spawn_blocking(move || dirs.iter().map(|d| dir_bytes(d)).sum::<u64>())
                .await
                .unwrap_or(0);
        if last == Some(now) {
            break;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The median of three runs of a baseline (ms), each from a synced state.
async fn median3<F>(mut run: F) -> Result<f64, Error>
where
    F: FnMut(usize) -> Result<Duration, Error>,
{
    let mut times = Vec::with_capacity(3);
    for i in 0..3 {
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        times.push(ms(run(i)?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<Duration, Error> {
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| failed(format!("cannot run {what}: {e}")))?;
    let took = started.elapsed();
    if !status.success() {
        return Err(failed(format!("{what} failed: {status}")));
    }
    Ok(took)
}

fn baseline_tar(ws: &Path, out: &Path) -> Result<Duration, Error> {
    run_tool(
        Command::new("tar")
            .arg("-cf")
            .arg(out)
            .arg("-C")
            .arg(ws)
            .arg("."),
        "tar -cf",
    )
}

fn baseline_cp(ws: &Path, out: &Path) -> Result<Duration, Error> {
    run_tool(Command::new("cp").arg("-a").arg(ws).arg(out), "cp -a")
}

/// splitmix64: fast, deterministic, incompressible enough for a benchmark tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `size.files` files totalling about `size.bytes` into `size.dirs` directories (two
/// levels), sizes spread between half and one and a half times the mean.
fn generate(root: &Path, size: TreeSize) -> Result<(), Error> {
    let io = |e: std::io::Error| failed(format!("cannot write the bench tree: {e}"));
    let mean = size.bytes / size.files;
    let mut rng = Rng(0x5EED);
    let mut buf = Vec::new();
    for i in 0..size.files {
        let dir = root.join(format!("d{:02}/sub{}", i % size.dirs, i % 3));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let len = usize::try_from(mean / 2 + rng.next() % mean.max(1)).unwrap_or(0);
        buf.resize(len, 0);
        rng.fill(&mut buf);
        std::fs::write(dir.join(format!("f{i:05}.bin")), &buf).map_err(io)?;
    }
    Ok(())
}

/// Rewrites one file with new content of the same size.
fn change_one_file(ws: &Path) -> Result<(), Error> {
    let path = ws.join("d00/sub0/f00000.bin");
    let mut content =
        std::fs::read(&path).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
    for b in &mut content {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&path, content)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
}

/// The restored tree has the right number of files.
fn verify_restored(ws: &Path, size: TreeSize) -> Result<(), Error> {
    fn files(dir: &Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => files(&e.path()),
                    Ok(_) => 1,
                    Err(_) => 0,
                })
                .sum()
        })
    }
    let found = files(ws);
    if found == size.files {
        Ok(())
    } else {
        Err(failed(format!(
            "the restore on worker 2 has {found} files, expected {}",
            size.files
        )))
    }
}
