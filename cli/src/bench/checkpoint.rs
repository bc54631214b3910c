//! Checkpoints against `tar -cf` and `cp -a` of the same tree, in alternating rounds.
//!
//! Starts its own local cluster with two workers (labels `w=1`, `w=2`). Each round (three;
//! `--quick`: two) opens a fresh session on each worker and writes a tree of its own (10,000
//! files / 200 MiB; `--quick`: 300 files / 3 MiB) straight into the worker-1 session's
//! workspace, from a seed of its own, so the coordinator and the workers hold none of its
//! blobs yet. Then it measures three pairs, each in the round's order ([`paired::order`]: the
//! checkpoint step first in even rounds, the baseline first in odd ones):
//!
//! - the first capture (everything hashed and uploaded, made durable at the coordinator)
//!   against `cp -a` of the tree;
//! - one file changed, then a capture (a delta against the first) against `tar -cf` of the
//!   tree;
//! - a restore of the round's first checkpoint into the worker-2 session (cold: every blob
//!   fetched, none of them cached there yet) against `cp -a` of the tree again;
//!
//! and, unpaired, a restore of the first checkpoint in place on worker 1 (warm: from its cache
//! and unchanged files). The phase reports the medians of each step's times and, for each
//! pair, the median of the per-round ratios with the lowest and highest round: on this kind of
//! machine `cp -a` of the same tree varies by a factor of three between runs, and a ratio of two
//! medians taken minutes apart swings with it.
//!
//! Times are what the client sees for the RPC. Captures include the coordinator's fsync of the
//! uploaded blobs; `tar` and `cp` only write to the page cache. The first capture is also
//! reported against `cp -a` followed by a `syncfs` of the copy (the copy made durable, as the
//! capture is when it returns). Every step starts from a clean
//! page-cache-warm state: `sync`, and background blob-cache fills allowed to finish
//! ([`settle`]).
//!
//! Nothing is deleted until the end (the trees, copies and archives of every round stay, about
//! 1.6 GiB a round in a full run): on ext4, creating files soon after thousands were deleted is
//! several times slower (the inode allocator skips recently deleted inodes), which would distort
//! whichever step came next.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use heist_proto::v1::CaptureStats;

use super::{
    failed,
    paired::{Spread, Which, order},
    phases::{Lab, Phase, count_f64},
    progress,
    report::Metric,
};
use crate::{
    client::Client,
    cluster::{LocalCluster, Options},
    error::Error,
};

/// How long one checkpoint call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Rounds of a full run (`--quick`: 2, one in each order).
const ROUNDS: usize = 3;
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
        "checkpoint capture/restore vs tar -cf and cp -a of the same tree (2 workers, \
         alternating rounds)"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let quick = lab.settings.quick;
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
            let rounds = if quick { 2 } else { ROUNDS };
            let measured = measure(&cluster, &data_dir, TreeSize::for_run(quick), rounds).await;
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

/// The worker's own time for a capture (ms).
fn worker_ms(stats: &CaptureStats) -> f64 {
    ms(Duration::from_micros(stats.duration_us))
}

/// The median (NaN for none).
fn median(values: &[f64]) -> f64 {
    Spread::of(values).median
}

async fn measure(
    cluster: &LocalCluster,
    data_dir: &Path,
    size: TreeSize,
    rounds: usize,
) -> Result<Vec<Metric>, Error> {
    let scratch = data_dir.join("baseline");
    std::fs::create_dir_all(&scratch)
        .map_err(|e| failed(format!("cannot create {}: {e}", scratch.display())))?;
    let bench = Bench {
        cluster,
        client: cluster.client().await?,
        data_dir,
        scratch,
        size,
    };
    let mut samples = Samples::default();
    for round in 0..rounds {
        bench.round(round, rounds, &mut samples).await?;
    }
    let mut metrics = samples.metrics(size, rounds);
    metrics.retain(|m| m.value.is_finite());
    Ok(metrics)
}

/// What every round works with.
struct Bench<'a> {
    cluster: &'a LocalCluster,
    client: Client,
    data_dir: &'a Path,
    /// Where the `tar` and `cp` outputs go (kept until the end).
    scratch: PathBuf,
    size: TreeSize,
}

/// What the rounds measured, one entry per round (ms unless named otherwise).
#[derive(Debug, Default)]
struct Samples {
    tar: Vec<f64>,
    /// Both `cp -a` runs of every round.
    cp: Vec<f64>,
    full: Vec<f64>,
    full_worker: Vec<f64>,
    /// What a first capture took after the worker answered (the coordinator's sync and commit,
    /// and the hop back).
    full_after_worker: Vec<f64>,
    one: Vec<f64>,
    one_worker: Vec<f64>,
    /// The most files a capture after one change hashed.
    one_hashed_files: u64,
    /// The most manifest entries a capture after one change sent.
    one_sent_entries: u64,
    /// The most workspace entries a capture after one change examined.
    one_examined_entries: u64,
    restore_other: Vec<f64>,
    restore_in_place: Vec<f64>,
    /// first capture / `cp -a`.
    full_vs_cp: Vec<f64>,
    /// first capture / `cp -a` and a `syncfs` after it (both durable when they end).
    full_vs_cp_synced: Vec<f64>,
    /// CPU time of the first capture (coordinator + workers) and of the `cp -a` paired with it
    /// (ms): what each step costs the machine, which its neighbours on the disk do not move as
    /// much as its duration.
    full_cpu: Vec<f64>,
    cp_cpu: Vec<f64>,
    /// first capture's CPU / `cp -a`'s.
    full_vs_cp_cpu: Vec<f64>,
    /// capture after one change / `tar -cf`.
    one_vs_tar: Vec<f64>,
    /// restore on worker 2 / `cp -a`.
    restore_other_vs_cp: Vec<f64>,
}

/// One round's sessions and tree.
struct Round {
    /// 0-based; its parity gives the order ([`order`]).
    index: usize,
    /// The session on worker 1 whose workspace holds the tree.
    here: String,
    /// The session on worker 2 restored into.
    other: String,
    /// The tree: `here`'s workspace.
    ws: PathBuf,
}

impl Bench<'_> {
    /// One round: a fresh tree in fresh sessions, then the three pairs and a restore in place.
    async fn round(&self, index: usize, rounds: usize, out: &mut Samples) -> Result<(), Error> {
        let labels = |w: &str| [("w".to_owned(), w.to_owned())].into_iter().collect();
        let here = self.client.create_session(labels("1"), &rid()).await?.id;
        let other = self.client.create_session(labels("2"), &rid()).await?.id;
        let ws = self.workspace(1, &here)?;
        progress(&format!(
            "checkpoint: round {}/{rounds}, writing {} files ({} MiB) into {}",
            index + 1,
            self.size.files,
            self.size.bytes >> 20,
            ws.display()
        ));
        let (tree, size) = (ws.clone(), self.size);
        let seed = u64::try_from(index).unwrap_or(u64::MAX);
        tokio::task::spawn_blocking(move || generate(&tree, size, seed))
            .await
            .map_err(|e| failed(format!("tree generation failed: {e}")))??;
        settle(self.data_dir).await;
        let round = Round {
            index,
            here,
            other,
            ws,
        };
        let first = self.first_capture(&round, out).await?;
        self.one_change(&round, out).await?;
        self.restore_other(&round, &first, out).await?;
        let (_, here_ms) = timed(self.client.restore_checkpoint(&first, None, &rid())).await?;
        settle(self.data_dir).await;
        progress(&format!("checkpoint: restore in place {here_ms:.0} ms"));
        out.restore_in_place.push(here_ms);
        Ok(())
    }

    /// The first capture of the round's tree against `cp -a` of it; the checkpoint's id.
    async fn first_capture(&self, round: &Round, out: &mut Samples) -> Result<String, Error> {
        let id = rid();
        let capture = self
            .client
            .create_checkpoint(&round.here, Default::default(), &id);
        let capture = cpu_timed(|| self.cluster.cpu_seconds(), timed(capture));
        let copy = cpu_timed(children_cpu_seconds, self.durable_copy(round, "copy"));
        let (((first, capture_ms), capture_cpu), ((cp_ms, cp_sync_ms), cp_cpu)) =
            alternate(round.index, self.data_dir, capture, copy).await?;
        // CPU time is counted in clock ticks (10 ms): a tree small enough for `cp` to take
        // less than one gives no ratio.
        if let (Some(capture_cpu), Some(cp_cpu)) = (capture_cpu, cp_cpu.filter(|&t| t > 0.0)) {
            out.full_cpu.push(capture_cpu);
            out.cp_cpu.push(cp_cpu);
            out.full_vs_cp_cpu.push(capture_cpu / cp_cpu);
        }
        let stats = first.stats.unwrap_or_default();
        let files = self.size.files;
        if stats.files != files || stats.uploaded_blobs != files {
            return Err(failed(format!(
                "first capture recorded {} files and uploaded {} blobs; expected {files} of \
                 each (a tree the coordinator has no blob of)",
                stats.files, stats.uploaded_blobs
            )));
        }
        progress(&format!(
            "checkpoint: first capture {capture_ms:.0} ms, cp -a {cp_ms:.0} ms: {:.2}x; \
             cp -a + syncfs {:.0} ms: {:.2}x",
            capture_ms / cp_ms,
            cp_ms + cp_sync_ms,
            capture_ms / (cp_ms + cp_sync_ms)
        ));
        out.full.push(capture_ms);
        out.full_worker.push(worker_ms(&stats));
        out.full_after_worker.push(capture_ms - worker_ms(&stats));
        out.cp.push(cp_ms);
        out.full_vs_cp.push(capture_ms / cp_ms);
        out.full_vs_cp_synced
            .push(capture_ms / (cp_ms + cp_sync_ms));
        Ok(first.id)
    }

    /// One file changed, then a capture (a delta against the last checkpoint), against
    /// `tar -cf` of the tree.
    async fn one_change(&self, round: &Round, out: &mut Samples) -> Result<(), Error> {
        let capture = async {
            change_one_file(&round.ws)?;
            settle(self.data_dir).await;
            let id = rid();
            let capture = self
                .client
                .create_checkpoint(&round.here, Default::default(), &id);
            timed(capture).await
        };
        let archive = self.scratch.join(format!("tree-{}.tar", round.index));
        let tar = async { baseline_tar(&round.ws, &archive).map(ms) };
        let ((second, capture_ms), tar_ms) =
            alternate(round.index, self.data_dir, capture, tar).await?;
        let stats = second.stats.unwrap_or_default();
        if stats.uploaded_blobs != 1 {
            return Err(failed(format!(
                "capture after one change uploaded {} blobs, expected 1",
                stats.uploaded_blobs
            )));
        }
        progress(&format!(
            "checkpoint: capture after one change {capture_ms:.1} ms (examined {} entries, hashed \
             {} files, sent {} manifest entries), tar -cf {tar_ms:.0} ms: {:.3}x",
            stats.examined_entries,
            stats.hashed_files,
            stats.sent_entries,
            capture_ms / tar_ms
        ));
        out.one.push(capture_ms);
        out.one_worker.push(worker_ms(&stats));
        out.one_hashed_files = out.one_hashed_files.max(stats.hashed_files);
        out.one_sent_entries = out.one_sent_entries.max(stats.sent_entries);
        out.one_examined_entries = out.one_examined_entries.max(stats.examined_entries);
        out.tar.push(tar_ms);
        out.one_vs_tar.push(capture_ms / tar_ms);
        Ok(())
    }

    /// A restore of the round's first checkpoint into its session on worker 2 (cold: the
    /// round's blobs are new there) against `cp -a` of the tree.
    async fn restore_other(
        &self,
        round: &Round,
        checkpoint: &str,
        out: &mut Samples,
    ) -> Result<(), Error> {
        let id = rid();
        let restore = self
            .client
            .restore_checkpoint(checkpoint, Some(&round.other), &id);
        let copy = self.copy(round, "copy-again");
        let ((_, restore_ms), cp_ms) =
            alternate(round.index, self.data_dir, timed(restore), copy).await?;
        verify_restored(&self.workspace(2, &round.other)?, self.size)?;
        progress(&format!(
            "checkpoint: restore on the other worker {restore_ms:.0} ms, cp -a {cp_ms:.0} ms: \
             {:.2}x",
            restore_ms / cp_ms
        ));
        out.restore_other.push(restore_ms);
        out.cp.push(cp_ms);
        out.restore_other_vs_cp.push(restore_ms / cp_ms);
        Ok(())
    }

    /// `cp -a` of the round's tree, then a `syncfs` of the copy's file system: the copy's time
    /// and the sync's (ms). A capture is durable when it returns; this is the copy made as
    /// durable.
    fn durable_copy(
        &self,
        round: &Round,
        name: &str,
    ) -> impl Future<Output = Result<(f64, f64), Error>> {
        let out = self.copy_path(round, name);
        let copy = self.copy(round, name);
        async move {
            let cp_ms = copy.await?;
            let started = Instant::now();
            std::fs::File::open(&out)
                .and_then(|dir| nix::unistd::syncfs(&dir).map_err(std::io::Error::from))
                .map_err(|e| failed(format!("cannot sync {}: {e}", out.display())))?;
            Ok((cp_ms, ms(started.elapsed())))
        }
    }

    /// `cp -a` of the round's tree to [`Self::copy_path`] (ms), when awaited.
    fn copy(&self, round: &Round, name: &str) -> impl Future<Output = Result<f64, Error>> {
        let out = self.copy_path(round, name);
        let ws = round.ws.clone();
        async move { baseline_cp(&ws, &out).map(ms) }
    }

    /// Where [`Self::copy`] puts the round's copy named `name`: `<name>-<round>`.
    fn copy_path(&self, round: &Round, name: &str) -> PathBuf {
        self.scratch.join(format!("{name}-{}", round.index))
    }

    /// The workspace directory of a session on worker `worker`.
    fn workspace(&self, worker: u8, session: &str) -> Result<PathBuf, Error> {
        let ws = self
            .data_dir
            .join(format!("worker-{worker}/workspaces"))
            .join(session);
        if ws.is_dir() {
            Ok(ws)
        } else {
            Err(failed(format!("workspace {} not found", ws.display())))
        }
    }
}

impl Samples {
    /// The tree, the medians of the steps and, for each pair, the median of its per-round
    /// ratios with the lowest and highest round.
    fn metrics(&self, size: TreeSize, rounds: usize) -> Vec<Metric> {
        let mut metrics = vec![
            Metric::new("files", "files in the tree", count_f64(size.files), "files"),
            Metric::new(
                "mib",
                "size of the tree",
                count_f64(size.bytes >> 20),
                "MiB",
            ),
            Metric::new(
                "rounds",
                "rounds (a new tree each, the order flipping)",
                count_f64(u64::try_from(rounds).unwrap_or(u64::MAX)),
                "rounds",
            ),
        ];
        metrics.extend(self.medians());
        metrics.extend(Spread::of(&self.full_vs_cp).metrics(
            [
                "capture_full_vs_cp",
                "capture_full_vs_cp_min",
                "capture_full_vs_cp_max",
            ],
            [
                "first capture / cp -a, median of per-round ratios",
                "first capture / cp -a, lowest round",
                "first capture / cp -a, highest round",
            ],
        ));
        metrics.extend(Spread::of(&self.full_vs_cp_synced).metrics(
            [
                "capture_full_vs_cp_synced",
                "capture_full_vs_cp_synced_min",
                "capture_full_vs_cp_synced_max",
            ],
            [
                "first capture / (cp -a + syncfs), median of per-round ratios",
                "first capture / (cp -a + syncfs), lowest round",
                "first capture / (cp -a + syncfs), highest round",
            ],
        ));
        metrics.extend(Spread::of(&self.full_vs_cp_cpu).metrics(
            [
                "capture_full_vs_cp_cpu",
                "capture_full_vs_cp_cpu_min",
                "capture_full_vs_cp_cpu_max",
            ],
            [
                "first capture CPU / cp -a CPU, median of per-round ratios",
                "first capture CPU / cp -a CPU, lowest round",
                "first capture CPU / cp -a CPU, highest round",
            ],
        ));
        metrics.extend(Spread::of(&self.one_vs_tar).metrics(
            [
                "capture_one_vs_tar",
                "capture_one_vs_tar_min",
                "capture_one_vs_tar_max",
            ],
            [
                "capture after 1 change / tar -cf, median of per-round ratios",
                "capture after 1 change / tar -cf, lowest round",
                "capture after 1 change / tar -cf, highest round",
            ],
        ));
        metrics.extend(Spread::of(&self.restore_other_vs_cp).metrics(
            [
                "restore_other_vs_cp",
                "restore_other_vs_cp_min",
                "restore_other_vs_cp_max",
            ],
            [
                "restore on the other worker / cp -a, median of per-round ratios",
                "restore on the other worker / cp -a, lowest round",
                "restore on the other worker / cp -a, highest round",
            ],
        ));
        metrics
    }

    /// The medians of the steps' times, and how much a capture after one change did.
    fn medians(&self) -> Vec<Metric> {
        vec![
            Metric::new("tar_ms", "tar -cf (median)", median(&self.tar), "ms"),
            Metric::new(
                "cp_ms",
                "cp -a (median, 2 runs a round)",
                median(&self.cp),
                "ms",
            ),
            Metric::new(
                "capture_full_ms",
                "first capture (median)",
                median(&self.full),
                "ms",
            ),
            Metric::new(
                "capture_full_cpu_ms",
                "first capture, CPU of coordinator + workers (median)",
                median(&self.full_cpu),
                "ms",
            ),
            Metric::new(
                "cp_cpu_ms",
                "cp -a paired with it, CPU (median)",
                median(&self.cp_cpu),
                "ms",
            ),
            Metric::new(
                "capture_one_ms",
                "capture after 1 file changed (median)",
                median(&self.one),
                "ms",
            ),
            Metric::new(
                "capture_one_worker_ms",
                "capture after 1 file changed, worker side (median)",
                median(&self.one_worker),
                "ms",
            ),
            Metric::new(
                "capture_one_hashed_files",
                "files hashed after 1 change (most in a round)",
                count_f64(self.one_hashed_files),
                "files",
            ),
            Metric::new(
                "capture_one_sent_entries",
                "manifest entries sent after 1 change (most in a round)",
                count_f64(self.one_sent_entries),
                "entries",
            ),
            Metric::new(
                "capture_one_examined_entries",
                "workspace entries examined after 1 change (most in a round)",
                count_f64(self.one_examined_entries),
                "entries",
            ),
            Metric::new(
                "restore_other_ms",
                "restore on the other worker, cold (median)",
                median(&self.restore_other),
                "ms",
            ),
            Metric::new(
                "restore_in_place_ms",
                "restore in place, warm (median)",
                median(&self.restore_in_place),
                "ms",
            ),
            Metric::new(
                "capture_worker_full_ms",
                "first capture, worker side (median)",
                median(&self.full_worker),
                "ms",
            ),
            Metric::new(
                "capture_full_after_worker_ms",
                "first capture, after the worker answered: sync and commit (median)",
                median(&self.full_after_worker),
                "ms",
            ),
        ]
    }
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `step` and the CPU time `cpu` (seconds, cumulative) rose by while it ran, in ms; `None` where
/// `cpu` could not be read.
async fn cpu_timed<T>(
    cpu: impl Fn() -> Option<f64>,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<(T, Option<f64>), Error> {
    let before = cpu();
    let out = step.await?;
    let used = before.zip(cpu()).map(|(b, a)| (a - b) * 1000.0);
    Ok((out, used))
}

/// CPU time (user + system, seconds) of this process's children that have been waited for
/// (`cutime` and `cstime` of `/proc/self/stat`): a baseline tool's, read around its run.
fn children_cpu_seconds() -> Option<f64> {
    // cutime and cstime: the 14th and 15th fields after the command name.
    crate::cluster::process::stat_seconds("/proc/self/stat", 13)
}

async fn timed<T>(call: impl Future<Output = Result<T, Error>>) -> Result<(T, f64), Error> {
    let started = Instant::now();
    let out = call.await?;
    Ok((out, ms(started.elapsed())))
}

/// Runs `a` and `b` in the order of `round` ([`order`]: `a` first in even rounds, `b` first in
/// odd ones), letting the machine [`settle`] after each. Neither starts before it is awaited.
async fn alternate<A, B>(
    round: usize,
    data_dir: &Path,
    a: impl Future<Output = Result<A, Error>>,
    b: impl Future<Output = Result<B, Error>>,
) -> Result<(A, B), Error> {
    if order(round)[0] == Which::A {
        let a = a.await?;
        settle(data_dir).await;
        let b = b.await?;
        settle(data_dir).await;
        Ok((a, b))
    } else {
        let b = b.await?;
        settle(data_dir).await;
        let a = a.await?;
        settle(data_dir).await;
        Ok((a, b))
    }
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
/// levels), sizes spread between half and one and a half times the mean. The content follows
/// from `seed`: trees of different seeds share no file content.
fn generate(root: &Path, size: TreeSize, seed: u64) -> Result<(), Error> {
    let io = |e: std::io::Error| failed(format!("cannot write the bench tree: {e}"));
    let mean = size.bytes / size.files;
    let mut rng = Rng(0x5EED_u64.wrapping_add(seed));
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
