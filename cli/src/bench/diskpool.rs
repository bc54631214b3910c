//! What the disk pool buys: session create+close pairs, one at a time, on three one-worker
//! clusters side by side: one that keeps file systems ready (HEIST_DISK_POOL=4, the default),
//! one that formats each session's on open (HEIST_DISK_POOL=0), and one that polls the disk
//! quota (HEIST_DISK_QUOTA=polling: no file system per session, the floor). They take turns in
//! rounds whose order rotates, so drift in the machine's speed hits all three; the phase reports
//! each side's create and close quantiles over all its rounds and the medians of the per-round
//! create p50 ratios (pool / none, pool / polling). Only a worker that may give each session its
//! own file system (root and loop devices: HEIST_DISK_QUOTA=auto picks `fs`) has a pool;
//! elsewhere all three poll and should match.

use futures::future::BoxFuture;

use super::{
    load::Latencies,
    paired::{Spread, env, rounds, start_cluster, stop_cluster},
    phases::{Lab, Phase, count_f64},
    report::Metric,
    sessions::{close, create},
};
use crate::{client::Client, cluster::LocalCluster, error::Error};

/// The diskpool phase.
pub struct DiskPool;

impl Phase for DiskPool {
    fn name(&self) -> &'static str {
        "diskpool"
    }

    fn title(&self) -> &'static str {
        "CreateSession then CloseSession one at a time: disk pool of 4, no pool, polled quota \
         (rotating rounds)"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(measure(lab))
    }
}

/// One side: its cluster's name, environment, and the names and labels of its create p50,
/// create p99 and close p50 metrics.
struct SideSpec {
    name: &'static str,
    env: (&'static str, &'static str),
    metrics: [(&'static str, &'static str); 3],
}

/// The sides: the pool first, then the two it is compared with.
const SIDES: [SideSpec; 3] = [
    SideSpec {
        name: "on",
        env: ("HEIST_DISK_POOL", "4"),
        metrics: [
            ("on_create_p50_ms", "create p50, pool of 4"),
            ("on_create_p99_ms", "create p99, pool of 4"),
            ("on_close_p50_ms", "close p50, pool of 4"),
        ],
    },
    SideSpec {
        name: "off",
        env: ("HEIST_DISK_POOL", "0"),
        metrics: [
            ("off_create_p50_ms", "create p50, no pool"),
            ("off_create_p99_ms", "create p99, no pool"),
            ("off_close_p50_ms", "close p50, no pool"),
        ],
    },
    SideSpec {
        name: "polling",
        env: ("HEIST_DISK_QUOTA", "polling"),
        metrics: [
            ("polling_create_p50_ms", "create p50, polled quota"),
            ("polling_create_p99_ms", "create p99, polled quota"),
            ("polling_close_p50_ms", "close p50, polled quota"),
        ],
    },
];

async fn measure(lab: &mut Lab) -> Result<Vec<Metric>, Error> {
    let mut clusters = Vec::with_capacity(SIDES.len());
    let mut started = Ok(());
    for side in &SIDES {
        let (key, value) = side.env;
        let name = format!("diskpool-{}", side.name);
        match start_cluster(lab, &name, vec![env(key, value)]).await {
            Ok(cluster) => clusters.push(cluster),
            Err(err) => {
                started = Err(err);
                break;
            }
        }
    }
    let result = match started {
        Ok(()) => rotate(lab, &clusters).await,
        Err(err) => Err(err),
    };
    let mut stopped = Ok(());
    for (cluster, dir) in clusters {
        let done = stop_cluster(cluster, &dir).await;
        stopped = stopped.and(done);
    }
    let metrics = result?;
    stopped?;
    Ok(metrics)
}

/// Create and close latencies of one side, over all its rounds.
struct Side {
    client: Client,
    creates: Latencies,
    closes: Latencies,
}

impl Side {
    /// `n` create+close pairs, one at a time: the round's create p50 in microseconds.
    async fn pairs(&mut self, n: u64) -> Result<f64, Error> {
        let mut round = Latencies::new();
        for _ in 0..n {
            let started = tokio::time::Instant::now();
            let id = create(&self.client).await?;
            let created = tokio::time::Instant::now();
            close(&self.client, &id).await?;
            round.record(created - started);
            self.creates.record(created - started);
            self.closes.record(created.elapsed());
        }
        Ok(round.quantile_us(0.5))
    }
}

async fn rotate(
    lab: &Lab,
    clusters: &[(LocalCluster, std::path::PathBuf)],
) -> Result<Vec<Metric>, Error> {
    let s = &lab.settings;
    let mut sides = Vec::with_capacity(clusters.len());
    for (cluster, _) in clusters {
        let client = cluster.client().await?;
        for _ in 0..s.session_warmup {
            let id = create(&client).await?;
            close(&client, &id).await?;
        }
        sides.push(Side {
            client,
            creates: Latencies::new(),
            closes: Latencies::new(),
        });
    }
    let rounds = rounds(s);
    let per_round = (s.session_iterations / rounds as u64).max(1);
    let (mut vs_off, mut vs_polling) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        super::progress(&format!(
            "diskpool: round {}/{rounds}, {per_round} create+close pairs per side",
            round + 1
        ));
        let mut p50 = [0.0; SIDES.len()];
        for turn in 0..sides.len() {
            let i = (round + turn) % sides.len();
            p50[i] = sides[i].pairs(per_round).await?;
        }
        vs_off.push(p50[0] / p50[1]);
        vs_polling.push(p50[0] / p50[2]);
    }
    let ms = |l: &Latencies, q: f64| l.quantile_us(q) / 1000.0;
    let mut metrics = Vec::new();
    for (side, spec) in sides.iter().zip(&SIDES) {
        let [create_p50, create_p99, close_p50] = spec.metrics;
        metrics.push(Metric::new(
            create_p50.0,
            create_p50.1,
            ms(&side.creates, 0.5),
            "ms",
        ));
        metrics.push(Metric::new(
            create_p99.0,
            create_p99.1,
            ms(&side.creates, 0.99),
            "ms",
        ));
        metrics.push(Metric::new(
            close_p50.0,
            close_p50.1,
            ms(&side.closes, 0.5),
            "ms",
        ));
    }
    metrics.extend(Spread::of(&vs_off).metrics(
        ["on_vs_off", "on_vs_off_min", "on_vs_off_max"],
        [
            "create p50 pool / no pool, median of per-round ratios",
            "create p50 pool / no pool, lowest round",
            "create p50 pool / no pool, highest round",
        ],
    ));
    metrics.extend(Spread::of(&vs_polling).metrics(
        ["on_vs_polling", "on_vs_polling_min", "on_vs_polling_max"],
        [
            "create p50 pool / polled quota, median of per-round ratios",
            "create p50 pool / polled quota, lowest round",
            "create p50 pool / polled quota, highest round",
        ],
    ));
    metrics.push(Metric::new(
        "pairs",
        "create+close pairs per side",
        count_f64(sides[0].creates.count()),
        "pairs",
    ));
    Ok(metrics)
}
