//! Concurrency scaling: routed `echo` throughput with 1, 2 and 4 workers behind one coordinator.
//!
//! Each step starts its own local cluster, opens one session per worker (placement spreads them),
//! and keeps `--concurrency` calls in flight split evenly over the sessions for the throughput
//! window. On a machine with fewer cores than processes the curve measures contention, not
//! capacity: the report says how many CPUs it ran on.

use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};

use super::{
    failed,
    load::{self, EchoTarget},
    phases::{Lab, Phase},
    report::Metric,
};
use crate::{
    cluster::{LocalCluster, Options},
    error::Error,
};

/// Worker counts measured, with the metric each one reports.
const STEPS: [(usize, &str, &str); 3] = [
    (1, "workers_1_calls_per_s", "throughput, 1 worker"),
    (2, "workers_2_calls_per_s", "throughput, 2 workers"),
    (4, "workers_4_calls_per_s", "throughput, 4 workers"),
];

/// The scaling phase.
pub struct Scaling;

impl Phase for Scaling {
    fn name(&self) -> &'static str {
        "scaling"
    }

    fn title(&self) -> &'static str {
        "routed echo throughput with 1, 2 and 4 workers"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let mut metrics = Vec::new();
            let mut first = None;
            for (workers, name, label) in STEPS {
                let per_second = measure(lab, workers).await?;
                first.get_or_insert(per_second);
                metrics.push(Metric::new(name, label, per_second, "calls/s"));
            }
            if let (Some(one), Some(last)) = (first, metrics.last().map(|m| m.value)) {
                metrics.push(Metric::new(
                    "workers_4_vs_1",
                    "4 workers / 1 worker",
                    last / one,
                    "x",
                ));
            }
            Ok(metrics)
        })
    }
}

/// Throughput of one cluster of `workers` workers.
async fn measure(lab: &Lab, workers: usize) -> Result<f64, Error> {
    let s = &lab.settings;
    super::progress(&format!(
        "scaling: {workers} worker(s), {} calls in flight for {:.1} s",
        s.concurrency,
        s.throughput().as_secs_f64()
    ));
    let data_dir = std::env::temp_dir().join(format!(
        "heist-bench-scaling-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let cluster = LocalCluster::start(Options {
        workers,
        port: 0,
        data_dir: Some(data_dir.clone()),
        bin_dir: lab.bin_dir.clone(),
        log_level: lab.cluster_log_level.clone(),
        call_timeout: s.call_timeout(),
        ..Options::default()
    })
    .await?;
    let measured = load_cluster(&cluster, workers, lab).await;
    cluster.stop().await?;
    if let Err(err) = std::fs::remove_dir_all(&data_dir) {
        tracing::warn!(%err, dir = %data_dir.display(), "cannot remove the bench data directory");
    }
    measured
}

/// Opens one session per worker and drives them all at once.
async fn load_cluster(cluster: &LocalCluster, workers: usize, lab: &Lab) -> Result<f64, Error> {
    let s = &lab.settings;
    let client = cluster.client().await?;
    let mut targets = Vec::with_capacity(workers);
    let mut placed_on = std::collections::BTreeSet::new();
    for _ in 0..workers {
        let session = client
            .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
            .await?;
        placed_on.insert(session.worker_id.clone());
        let target = EchoTarget::connect(
            cluster.coordinator_url(),
            Some(cluster.access_token()),
            &session.id,
            s.call_timeout(),
        )
        .await?;
        target.verify().await?;
        targets.push(target);
    }
    if placed_on.len() != workers {
        return Err(failed(format!(
            "{workers} sessions landed on {} worker(s); placement should spread them",
            placed_on.len()
        )));
    }
    let per_target = s.concurrency.div_ceil(workers).max(1);
    let mut runs: FuturesUnordered<_> = targets
        .iter()
        .map(|t| load::throughput(t, per_target, s.throughput_warmup(), s.throughput()))
        .collect();
    let mut total = 0.0;
    while let Some(result) = runs.next().await {
        total += result?.per_second();
    }
    Ok(total)
}
