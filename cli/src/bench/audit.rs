//! What auditing executed calls costs: routed `echo` throughput on a cluster that writes a
//! `tool.executed` record for every call (`HEIST_AUDIT_CALLS=all`, the default) against one
//! that records none (`off`). Both clusters run side by side and are loaded in alternating
//! rounds (the order flips every round), so drift in the machine's speed hits both; the phase
//! reports the median of the per-round ratios. At the end the audited cluster's log must
//! verify intact and hold a record per call.

use std::{path::PathBuf, time::Duration};

use futures::future::BoxFuture;

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

/// Audited/unaudited round pairs (`--quick`: 2).
const ROUNDS: usize = 5;

/// The audit phase.
pub struct Audit;

impl Phase for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn title(&self) -> &'static str {
        "routed echo throughput, every call audited vs executed calls not audited"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(measure(lab))
    }
}

async fn measure(lab: &mut Lab) -> Result<Vec<Metric>, Error> {
    let audited = start(lab, "all").await?;
    let plain = match start(lab, "off").await {
        Ok(plain) => plain,
        Err(err) => {
            audited.0.stop().await?;
            return Err(err);
        }
    };
    let result = rounds(lab, &audited.0, &plain.0).await;
    for (cluster, dir) in [audited, plain] {
        cluster.stop().await?;
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%err, dir = %dir.display(), "cannot remove the bench data directory");
        }
    }
    result
}

/// A one-worker cluster with HEIST_AUDIT_CALLS=`calls`, and its data directory.
async fn start(lab: &Lab, calls: &str) -> Result<(LocalCluster, PathBuf), Error> {
    let data_dir = std::env::temp_dir().join(format!(
        "heist-bench-audit-{calls}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let cluster = LocalCluster::start(Options {
        workers: 1,
        port: 0,
        data_dir: Some(data_dir.clone()),
        max_sessions: Some(lab.settings.worker_max_sessions()),
        bin_dir: lab.bin_dir.clone(),
        log_level: lab.cluster_log_level.clone(),
        call_timeout: lab.settings.call_timeout(),
        env: vec![("HEIST_AUDIT_CALLS".to_owned(), calls.to_owned())],
        ..Options::default()
    })
    .await?;
    Ok((cluster, data_dir))
}

async fn target(cluster: &LocalCluster, timeout: Duration) -> Result<EchoTarget, Error> {
    let client = cluster.client().await?;
    let session = client
        .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
        .await?;
    let target = EchoTarget::connect(
        cluster.coordinator_url(),
        Some(cluster.access_token()),
        &session.id,
        timeout,
    )
    .await?;
    target.verify().await?;
    Ok(target)
}

/// Records in the log of `cluster`, which must verify intact.
async fn intact_records(cluster: &LocalCluster) -> Result<u64, Error> {
    let verdict = cluster.client().await?.verify_audit().await?;
    if !verdict.intact {
        return Err(failed(format!(
            "the audit log of {} is broken at record {}: {}",
            cluster.coordinator_url(),
            verdict.broken_at_seq,
            verdict.reason
        )));
    }
    Ok(verdict.records)
}

async fn rounds(
    lab: &Lab,
    audited: &LocalCluster,
    plain: &LocalCluster,
) -> Result<Vec<Metric>, Error> {
    let s = &lab.settings;
    let (audited_target, plain_target) = (
        target(audited, s.call_timeout()).await?,
        target(plain, s.call_timeout()).await?,
    );
    let before = intact_records(audited).await?;
    let (mut on_rates, mut off_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut audited_calls = 0;
    let rounds = if s.quick { 2 } else { ROUNDS };
    for round in 0..rounds {
        super::progress(&format!(
            "audit: round {}/{rounds}, {} calls in flight for {:.1} s per side",
            round + 1,
            s.concurrency,
            s.throughput().as_secs_f64()
        ));
        let measure_one = async |t: &EchoTarget| {
            load::throughput(t, s.concurrency, s.throughput_warmup(), s.throughput()).await
        };
        let (on, off) = if round % 2 == 0 {
            let on = measure_one(&audited_target).await?;
            (on, measure_one(&plain_target).await?)
        } else {
            let off = measure_one(&plain_target).await?;
            (measure_one(&audited_target).await?, off)
        };
        audited_calls += on.calls;
        on_rates.push(on.per_second());
        off_rates.push(off.per_second());
        ratios.push(on.per_second() / off.per_second());
    }
    let written = intact_records(audited).await? - before;
    if written < audited_calls {
        return Err(failed(format!(
            "the audited cluster wrote {written} records for {audited_calls} measured calls"
        )));
    }
    Ok(vec![
        Metric::new(
            "on_calls_per_s",
            "every call audited, median",
            median(&mut on_rates),
            "calls/s",
        ),
        Metric::new(
            "off_calls_per_s",
            "executed calls not audited, median",
            median(&mut off_rates),
            "calls/s",
        ),
        Metric::new(
            "on_vs_off",
            "on / off, median of per-round ratios",
            median(&mut ratios),
            "x",
        ),
        Metric::new(
            "records_written",
            "audit records the audited cluster wrote (chain verified intact)",
            written as f64,
            "records",
        ),
    ])
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}
