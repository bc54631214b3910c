//! Bounded growth: many create+close pairs ([`PAIRS`], 16 at a time) on a one-worker cluster of
//! the phase's own whose closed sessions are collected at once (HEIST_SESSION_RETENTION_S=0,
//! collected every second), as are the request-id records of the creates and closes
//! (HEIST_IDEMPOTENCY_TTL_S=1). Its worker polls the disk quota (HEIST_DISK_QUOTA=polling): what is
//! measured is the records and state sessions leave behind, not the making of a file system per
//! session, which would bound the rate to a few dozen pairs a second. The coordinator's and the worker's RSS and the data directory's
//! allocated size are read after the first tenth of the pairs (warm), at the end, and once the
//! collector has run, which must leave no closed session listed. Flat: the end and collected
//! readings stay near the warm ones, however many pairs ran.

use std::{os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use futures::future::BoxFuture;

use super::{
    failed,
    paired::{env, start_cluster, stop_cluster},
    phases::{Lab, Phase, cluster_rss, count_f64, kib_f64},
    report::Metric,
    sessions::{close, create, in_parallel},
};
use crate::{cluster::LocalCluster, error::Error};

/// Create+close pairs of a full run (`--quick`: 200).
const PAIRS: u64 = 100_000;
/// Cap on the pairs of a full run (the usual loop cap is shorter than 100,000 pairs take).
const FULL_CAP: Duration = Duration::from_secs(900);
/// How long the collector gets after the last close (it runs every second).
const COLLECT_WAIT: Duration = Duration::from_secs(3);

/// The churn phase.
pub struct Churn;

impl Phase for Churn {
    fn name(&self) -> &'static str {
        "churn"
    }

    fn title(&self) -> &'static str {
        "bounded growth: create+close pairs, memory and disk before and after collection"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(measure(lab))
    }
}

/// Memory and disk at one moment.
struct Reading {
    coordinator_kib: Option<u64>,
    worker_kib: Option<u64>,
    disk_kib: u64,
}

impl Reading {
    fn take(cluster: &LocalCluster, data_dir: &Path) -> Self {
        let rss = cluster_rss(cluster);
        Self {
            coordinator_kib: rss.coordinator_kib,
            worker_kib: rss.worker_kib,
            disk_kib: allocated_bytes(data_dir) / 1024,
        }
    }
}

async fn measure(lab: &mut Lab) -> Result<Vec<Metric>, Error> {
    let env = vec![
        env("HEIST_SESSION_RETENTION_S", "0"),
        env("HEIST_SESSION_GC_INTERVAL_S", "1"),
        env("HEIST_IDEMPOTENCY_TTL_S", "1"),
        env("HEIST_DISK_QUOTA", "polling"),
    ];
    let (cluster, data_dir) = start_cluster(lab, "churn", env).await?;
    let result = churn(lab, &cluster, &data_dir).await;
    stop_cluster(cluster, &data_dir).await?;
    result
}

async fn churn(lab: &Lab, cluster: &LocalCluster, data_dir: &Path) -> Result<Vec<Metric>, Error> {
    let s = &lab.settings;
    let (pairs, cap) = if s.quick {
        (200, s.loop_cap())
    } else {
        (PAIRS, s.loop_cap().max(FULL_CAP))
    };
    let client = cluster.client().await?;
    let pair = |_| {
        let client = client.clone();
        async move {
            let id = create(&client).await?;
            close(&client, &id).await
        }
    };
    let warm_pairs = pairs / 10;
    super::progress(&format!("churn: {pairs} create+close pairs, 16 at a time"));
    let started = tokio::time::Instant::now();
    let (warm_done, error) = in_parallel(0..warm_pairs, cap, pair).await;
    if let Some(err) = error {
        return Err(err);
    }
    let warm = Reading::take(cluster, data_dir);
    let (rest_done, error) = in_parallel(warm_pairs..pairs, cap, pair).await;
    if let Some(err) = error {
        return Err(err);
    }
    let done = count_f64((warm_done.len() + rest_done.len()) as u64);
    let secs = started.elapsed().as_secs_f64();
    let end = Reading::take(cluster, data_dir);
    tokio::time::sleep(COLLECT_WAIT).await;
    let left = client.list_sessions(true, 1000).await?;
    if !left.is_empty() {
        return Err(failed(format!(
            "churn: {} closed sessions are still listed {} s after the last close (retention 0)",
            left.len(),
            COLLECT_WAIT.as_secs()
        )));
    }
    let collected = Reading::take(cluster, data_dir);

    let mut metrics = vec![
        Metric::new("pairs", "create+close pairs", done, "pairs"),
        Metric::new(
            "pairs_per_s",
            "pairs per second",
            done / secs.max(1e-9),
            "pairs/s",
        ),
    ];
    let mut add = |name, label, kib: Option<u64>| {
        if let Some(kib) = kib {
            metrics.push(Metric::new(name, label, kib_f64(kib), "KiB"));
        }
    };
    add(
        "coordinator_warm_kib",
        "coordinator RSS after the first tenth",
        warm.coordinator_kib,
    );
    add(
        "coordinator_end_kib",
        "coordinator RSS at the end",
        end.coordinator_kib,
    );
    add(
        "coordinator_collected_kib",
        "coordinator RSS after collection",
        collected.coordinator_kib,
    );
    add(
        "worker_warm_kib",
        "worker RSS after the first tenth",
        warm.worker_kib,
    );
    add("worker_end_kib", "worker RSS at the end", end.worker_kib);
    add(
        "worker_collected_kib",
        "worker RSS after collection",
        collected.worker_kib,
    );
    add(
        "disk_warm_kib",
        "data directory after the first tenth",
        Some(warm.disk_kib),
    );
    add(
        "disk_end_kib",
        "data directory at the end",
        Some(end.disk_kib),
    );
    add(
        "disk_collected_kib",
        "data directory after collection",
        Some(collected.disk_kib),
    );
    let ratio = |a: Option<u64>, b: Option<u64>| Some(kib_f64(a?) / kib_f64(b?).max(1.0));
    if let Some(r) = ratio(collected.coordinator_kib, warm.coordinator_kib) {
        metrics.push(Metric::new(
            "coordinator_collected_vs_warm",
            "coordinator RSS after collection / warm",
            r,
            "x",
        ));
    }
    if let Some(r) = ratio(Some(collected.disk_kib), Some(warm.disk_kib)) {
        metrics.push(Metric::new(
            "disk_collected_vs_warm",
            "data directory after collection / warm",
            r,
            "x",
        ));
    }
    Ok(metrics)
}

/// Bytes allocated to the files under `dir` (what the disk holds, holes not counted).
fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
