//! What exactly-once costs on the call path: a mutating call (`fs.write` of a small file) that
//! carries a request id of its own, against the same call without one, on one cluster and one
//! session. With an id the coordinator makes an intent record durable before the call leaves it,
//! and the worker records the id and the result durably before it answers; without one, neither
//! happens. Sequential p50 and throughput ([`IN_FLIGHT`] at once) are measured on both in
//! alternating rounds (the order flips every round), and the phase reports the medians and
//! spreads of the per-round ratios.
//! At the end a retry of one of the measured calls must be answered from its record, not
//! applied again.

use futures::future::BoxFuture;
use prost_types::Struct;

use super::{
    failed,
    load::string_value,
    paired::{self, Spread},
    phases::{Lab, Phase},
    report::Metric,
};
use crate::error::Error;

/// Writes in flight at once: a worker runs at most this many filesystem operations per session
/// at a time (its default HEIST_FS_POOL_PER_SESSION) and refuses more.
const IN_FLIGHT: usize = 4;

/// The exactly-once phase.
pub struct ExactlyOnce;

impl Phase for ExactlyOnce {
    fn name(&self) -> &'static str {
        "exactly_once"
    }

    fn title(&self) -> &'static str {
        "fs.write with a request id of its own vs without one (the cost of exactly-once)"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(measure(lab))
    }
}

/// The arguments of every measured write: a small file, replaced each time.
fn write_arguments(content: &str) -> Struct {
    let mut args = Struct::default();
    args.fields
        .insert("path".to_owned(), string_value("bench/exactly-once.txt"));
    args.fields
        .insert("content".to_owned(), string_value(content));
    args
}

async fn measure(lab: &mut Lab) -> Result<Vec<Metric>, Error> {
    let settings = lab.settings.clone();
    let cluster = lab.cluster().await?;
    let client = cluster.client().await?;
    let (echo, session) = paired::echo_target(cluster, settings.call_timeout()).await?;
    let result = async {
        let with_id = echo
            .clone()
            .for_tool("fs.write", write_arguments("with a request id"), true);
        let without = echo.for_tool("fs.write", write_arguments("without"), false);
        for target in [&with_id, &without] {
            let response = target.call().await?;
            if response.is_error {
                return Err(failed(format!("fs.write failed: {response:?}")));
            }
        }
        let (p50, tput) = paired::p50_and_throughput(
            "exactly-once",
            &with_id,
            &without,
            &settings,
            IN_FLIGHT.min(settings.concurrency),
        )
        .await?;
        replayed_not_reapplied(&client, &session).await?;
        let mut metrics = Spread::of(&p50).metrics(
            [
                "p50_with_id_vs_without",
                "p50_with_id_vs_without_min",
                "p50_with_id_vs_without_max",
            ],
            [
                "write p50 with a request id / without, median of alternating rounds",
                "write p50 with a request id / without, lowest round",
                "write p50 with a request id / without, highest round",
            ],
        );
        metrics.extend(Spread::of(&tput).metrics(
            [
                "tput_with_id_vs_without",
                "tput_with_id_vs_without_min",
                "tput_with_id_vs_without_max",
            ],
            [
                "write throughput with a request id / without, median of alternating rounds",
                "write throughput with a request id / without, lowest round",
                "write throughput with a request id / without, highest round",
            ],
        ));
        Ok(metrics)
    }
    .await;
    client
        .close_session(&session, &uuid::Uuid::new_v4().to_string())
        .await?;
    result
}

/// An append with a request id, sent twice: the file must hold it once (the retry is answered
/// from the record), so what was measured is the real exactly-once path.
async fn replayed_not_reapplied(
    client: &crate::client::Client,
    session: &str,
) -> Result<(), Error> {
    const LINE: &str = "once\n";
    let mut args = write_arguments(LINE);
    args.fields
        .insert("path".to_owned(), string_value("bench/replayed.txt"));
    args.fields.insert(
        "append".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::BoolValue(true)),
        },
    );
    let id = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        client
            .call_tool(session, "fs.write", args.clone(), &id)
            .await?;
    }
    let mut read = Struct::default();
    read.fields
        .insert("path".to_owned(), string_value("bench/replayed.txt"));
    let response = client.call_tool(session, "fs.read", read, "").await?;
    let size = response
        .structured_content
        .as_ref()
        .and_then(|s| s.fields.get("size"))
        .and_then(|v| match v.kind {
            Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
            _ => None,
        });
    #[allow(clippy::cast_precision_loss)]
    if size != Some(LINE.len() as f64) {
        return Err(failed(format!(
            "a retried append with its request id was applied again: fs.read says {response:?}"
        )));
    }
    Ok(())
}
