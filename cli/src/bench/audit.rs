//! What auditing executed calls costs: routed `echo` throughput on a cluster that writes a
//! `tool.executed` record for every call (`HEIST_AUDIT_CALLS=all`, the default) against one
//! that records none (`off`). Both clusters run side by side and are loaded in alternating
//! rounds (the order flips every round), so drift in the machine's speed hits both; the phase
//! reports the median of the per-round ratios. At the end the audited cluster's log must
//! verify intact and hold a record per call.

use futures::future::BoxFuture;

use super::{
    failed,
    paired::{Pair, env},
    phases::{Lab, Phase, count_f64},
    report::Metric,
};
use crate::{cluster::LocalCluster, error::Error};

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
    let pair = Pair::start(
        lab,
        "audit",
        vec![env("HEIST_AUDIT_CALLS", "all")],
        vec![env("HEIST_AUDIT_CALLS", "off")],
    )
    .await?;
    let result = rounds(lab, &pair).await;
    pair.stop().await?;
    result
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

async fn rounds(lab: &Lab, pair: &Pair) -> Result<Vec<Metric>, Error> {
    let before = intact_records(&pair.on.cluster).await?;
    let mut rounds = pair.alternate(lab, "audit", async |_| Ok(())).await?;
    let written = intact_records(&pair.on.cluster).await? - before;
    if written < rounds.on_calls {
        return Err(failed(format!(
            "the audited cluster wrote {written} records for {} measured calls",
            rounds.on_calls
        )));
    }
    let mut metrics = rounds.metrics(
        "every call audited, median",
        "executed calls not audited, median",
    );
    metrics.push(Metric::new(
        "records_written",
        "audit records the audited cluster wrote (chain verified intact)",
        count_f64(written),
        "records",
    ));
    Ok(metrics)
}
