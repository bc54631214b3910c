//! The `exec` phase: `exec true` in a session's sandbox through the cluster (client ->
//! coordinator -> worker -> heist-sandbox -> true) against a plain spawn of `true` with
//! tokio::process in heistctl itself, in the same run. The per-exec overhead is the difference
//! of the p50s; the target is at most 10 ms.
//!
//! Counts: `--calls` sandboxed execs and as many plain spawns (at most [`MAX_EXECS`] each:
//! every exec creates and tears down six namespaces), after `--warmup` of each (at most
//! [`MAX_WARMUP`]).

use futures::future::BoxFuture;
use heist_proto::json::struct_to_json;
use serde_json::json;

use super::{
    failed,
    load::{self, Latencies},
    phases::{Lab, Phase, count_f64},
    report::Metric,
};
use crate::{client::Client, error::Error};

/// Most sandboxed execs (and plain spawns) recorded.
pub const MAX_EXECS: u64 = 1000;
/// Most warm-up execs (and plain spawns).
pub const MAX_WARMUP: u64 = 50;

/// Sandboxed `exec true` versus a plain spawn.
pub struct Exec;

impl Phase for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn title(&self) -> &'static str {
        "exec true in the sandbox (client -> coordinator -> worker -> sandbox) vs a plain spawn"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let s = lab.settings.clone();
            let (count, warmup) = (s.calls.min(MAX_EXECS), s.warmup_calls.min(MAX_WARMUP));
            let client = lab.cluster().await?.client().await?;
            let session = client
                .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
                .await?;
            super::progress(&format!(
                "exec: {count} sandboxed `exec true` after {warmup} warm-up"
            ));
            let sandboxed = load::sequential("exec", warmup, count, s.loop_cap(), || {
                exec_true(&client, &session.id)
            })
            .await;
            client
                .close_session(&session.id, &uuid::Uuid::new_v4().to_string())
                .await?;
            let sandboxed = sandboxed?;
            super::progress(&format!("exec: {count} plain spawns of `true`"));
            let plain = load::sequential("spawn", warmup, count, s.loop_cap(), spawn_true).await?;
            Ok(metrics(&sandboxed, &plain))
        })
    }
}

/// One `exec true`, checked.
async fn exec_true(client: &Client, session: &str) -> Result<(), Error> {
    let args = heist_proto::json::json_to_struct(&json!({"argv": ["true"]}))
        .ok_or_else(|| failed("exec arguments are not an object"))?;
    let resp = client.call_tool(session, "exec", args, "").await?;
    let structured = resp
        .structured_content
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default();
    if resp.is_error || structured["exit_code"] != json!(0) {
        return Err(failed(format!(
            "exec true failed in the sandbox: {structured}"
        )));
    }
    Ok(())
}

/// One plain spawn of `true`, waited for.
async fn spawn_true() -> Result<(), Error> {
    let status = tokio::process::Command::new("true")
        .status()
        .await
        .map_err(|e| Error::io("cannot spawn `true`", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(format!("`true` exited with {status}")))
    }
}

/// The phase's numbers: both distributions and the overhead of the sandbox.
fn metrics(sandboxed: &Latencies, plain: &Latencies) -> Vec<Metric> {
    let ms = |us: f64| us / 1000.0;
    vec![
        Metric::new(
            "exec_p50_us",
            "sandboxed exec p50",
            sandboxed.quantile_us(0.5),
            "us",
        ),
        Metric::new(
            "exec_p99_us",
            "sandboxed exec p99",
            sandboxed.quantile_us(0.99),
            "us",
        ),
        Metric::new(
            "exec_mean_us",
            "sandboxed exec mean",
            sandboxed.mean_us(),
            "us",
        ),
        Metric::new(
            "spawn_p50_us",
            "plain spawn p50",
            plain.quantile_us(0.5),
            "us",
        ),
        Metric::new(
            "spawn_p99_us",
            "plain spawn p99",
            plain.quantile_us(0.99),
            "us",
        ),
        Metric::new(
            "overhead_p50_ms",
            "overhead per exec (p50 - p50)",
            ms(sandboxed.quantile_us(0.5) - plain.quantile_us(0.5)),
            "ms",
        ),
        Metric::new(
            "overhead_p99_ms",
            "overhead per exec (p99 - p99)",
            ms(sandboxed.quantile_us(0.99) - plain.quantile_us(0.99)),
            "ms",
        ),
        Metric::new(
            "execs",
            "sandboxed execs",
            count_f64(sandboxed.count()),
            "calls",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn overhead_is_the_difference_of_the_medians() {
        let mut sandboxed = Latencies::new();
        let mut plain = Latencies::new();
        for _ in 0..10 {
            sandboxed.record(Duration::from_millis(4));
            plain.record(Duration::from_millis(1));
        }
        let m = metrics(&sandboxed, &plain);
        let overhead = m
            .iter()
            .find(|m| m.name == "overhead_p50_ms")
            .expect("overhead")
            .value;
        assert!((overhead - 3.0).abs() < 0.1, "{overhead}");
    }
}
