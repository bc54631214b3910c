//! The load generators every call phase shares, so the cluster and the baselines are measured by
//! the same client code: [`EchoTarget`] (one CallTool, same payload, same channel settings),
//! [`sequential`] (one call at a time, latency histogram) and [`throughput`] (N calls in flight
//! for a fixed time).

use std::{future::Future, time::Duration};

use hdrhistogram::Histogram;
use heist_proto::v1::{self, content_block::Block, tool_service_client::ToolServiceClient};
use prost_types::{Struct, Value, value::Kind};
use tokio::{task::JoinSet, time::Instant};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tracing::Instrument;

use super::failed;
use crate::{client::error_chain, error::Error};

/// Most calls one throughput task makes, whatever the clock says.
const MAX_CALLS_PER_TASK: u64 = 10_000_000;

/// Longest latency a histogram tells apart (one hour), in nanoseconds.
const MAX_LATENCY_NANOS: u64 = 3_600_000_000_000;

/// A latency histogram (nanoseconds, 3 significant digits).
#[derive(Clone, Debug)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Self {
        let histogram = Histogram::new_with_bounds(1, MAX_LATENCY_NANOS, 3)
            .unwrap_or_else(|_| unreachable!("constant bounds are valid"));
        Self(histogram)
    }

    /// Records one sample (longer than an hour counts as an hour).
    pub fn record(&mut self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(nanos);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Self) {
        // Cannot fail: both histograms have the same bounds.
        let _ = self.0.add(&other.0);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        nanos_to_us(self.0.value_at_quantile(q))
    }

    /// The mean in microseconds.
    pub fn mean_us(&self) -> f64 {
        self.0.mean() / 1000.0
    }
}

#[allow(clippy::cast_precision_loss)]
fn nanos_to_us(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

/// The arguments every echo call sends (baselines and cluster alike).
pub fn echo_arguments() -> Struct {
    let mut args = Struct::default();
    args.fields.insert("msg".to_owned(), string_value("hello"));
    args.fields.insert(
        "n".to_owned(),
        Value {
            kind: Some(Kind::NumberValue(1.0)),
        },
    );
    args
}

/// A string as a `Struct` value.
pub fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Somewhere to send `echo` calls: a ToolService URL, the bearer token (baselines ignore it),
/// and the session the calls run in.
#[derive(Clone, Debug)]
pub struct EchoTarget {
    client: ToolServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
    message: v1::CallToolRequest,
    timeout: Duration,
    /// Every call gets a request id of its own (exactly-once), else none.
    fresh_request_ids: bool,
}

impl EchoTarget {
    /// Connects one HTTP/2 channel to `url` (loopback only).
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        session_id: &str,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|_| Error::BadUrl {
                url: url.to_owned(),
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::Unreachable {
                url: url.to_owned(),
                detail: error_chain(&e),
            })?;
        let authorization = token
            .map(|t| MetadataValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| failed("the access token is not a valid header value"))?;
        Ok(Self {
            client: ToolServiceClient::new(channel),
            authorization,
            message: v1::CallToolRequest {
                session_id: session_id.to_owned(),
                tool: "echo".to_owned(),
                arguments: Some(echo_arguments()),
                request_id: String::new(),
            },
            timeout,
            fresh_request_ids: false,
        })
    }

    /// The same target calling `tool` with `arguments` instead of `echo`, each call with a
    /// request id of its own when `fresh_request_ids` (what a client asking for exactly-once
    /// sends), else with none.
    pub fn for_tool(mut self, tool: &str, arguments: Struct, fresh_request_ids: bool) -> Self {
        tool.clone_into(&mut self.message.tool);
        self.message.arguments = Some(arguments);
        self.fresh_request_ids = fresh_request_ids;
        self
    }

    /// One call.
    pub async fn call(&self) -> Result<v1::CallToolResponse, Error> {
        let mut message = self.message.clone();
        if self.fresh_request_ids {
            message.request_id = uuid::Uuid::new_v4().to_string();
        }
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert(heist_proto::metadata::AUTHORIZATION, value.clone());
        }
        Ok(self.client.clone().call_tool(request).await?.into_inner())
    }

    /// One call whose answer is dropped.
    pub async fn call_once(&self) -> Result<(), Error> {
        self.call().await.map(drop)
    }

    /// One call, checking the answer has the echo shape (so nothing cheaper is measured).
    pub async fn verify(&self) -> Result<(), Error> {
        let response = self.call().await?;
        check_echo(&response, &echo_arguments())
    }
}

/// Something the load loops call (gRPC `echo` here; MCP `echo` in [`super::mcp`]).
pub trait Target: Clone + Send + Sync + 'static {
    /// One call whose answer is dropped.
    fn call_once(&self) -> impl Future<Output = Result<(), Error>> + Send;
}

impl Target for EchoTarget {
    fn call_once(&self) -> impl Future<Output = Result<(), Error>> + Send {
        EchoTarget::call_once(self)
    }
}

/// Checks a response carries `args` as a JSON block and as structured content.
pub fn check_echo(response: &v1::CallToolResponse, args: &Struct) -> Result<(), Error> {
    let block_ok = matches!(
        response.content.first().and_then(|b| b.block.as_ref()),
        Some(Block::Json(Value { kind: Some(Kind::StructValue(s)) })) if s == args
    );
    if response.is_error || !block_ok || response.structured_content.as_ref() != Some(args) {
        return Err(failed(format!(
            "echo returned something other than its arguments: {response:?}"
        )));
    }
    Ok(())
}

/// Runs `op` `warmup` times, then `count` times recording each latency; stops early (with a
/// warning) at `cap` after the start.
pub async fn sequential<F, Fut>(
    what: &str,
    warmup: u64,
    count: u64,
    cap: Duration,
    mut op: F,
) -> Result<Latencies, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let deadline = Instant::now() + cap;
    for _ in 0..warmup {
        if Instant::now() >= deadline {
            break;
        }
        op().await?;
    }
    let mut latencies = Latencies::new();
    for _ in 0..count {
        let start = Instant::now();
        if start >= deadline {
            tracing::warn!(
                what,
                done = latencies.count(),
                count,
                cap_s = cap.as_secs(),
                "time cap reached; stopping early"
            );
            break;
        }
        op().await?;
        latencies.record(start.elapsed());
    }
    if latencies.count() == 0 {
        return Err(failed(format!(
            "{what}: no call finished within {} s",
            cap.as_secs()
        )));
    }
    Ok(latencies)
}

/// What [`throughput`] measured.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Calls that completed inside the window.
    pub calls: u64,
    /// Calls that completed at all, warm-up included (what a process's CPU time covers).
    pub all_calls: u64,
    /// The window, in seconds.
    pub seconds: f64,
    /// Latency of the calls that started and ended inside the window.
    pub latencies: Latencies,
}

impl Throughput {
    /// Calls per second.
    #[allow(clippy::cast_precision_loss)]
    pub fn per_second(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

/// Keeps `concurrency` calls in flight: first for `warmup` (not counted), then for `window`,
/// counting the calls that complete inside the window.
pub async fn throughput<T: Target>(
    target: &T,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
) -> Result<Throughput, Error> {
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut tasks = JoinSet::new();
    for task in 0..concurrency {
        let target = target.clone();
        let span = tracing::debug_span!("bench_load", task);
        tasks.spawn(load_task(target, start, end).instrument(span));
    }
    let mut total = Throughput {
        calls: 0,
        all_calls: 0,
        seconds: window.as_secs_f64(),
        latencies: Latencies::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let (calls, all_calls, latencies) =
            joined.map_err(|e| failed(format!("a load task failed: {e}")))??;
        total.calls += calls;
        total.all_calls += all_calls;
        total.latencies.merge(&latencies);
    }
    if total.calls == 0 {
        return Err(failed("no call completed during the throughput window"));
    }
    Ok(total)
}

/// One caller of [`throughput`]: calls back to back until `end`.
async fn load_task<T: Target>(
    target: T,
    start: Instant,
    end: Instant,
) -> Result<(u64, u64, Latencies), Error> {
    let mut completed = 0;
    let mut all = 0;
    let mut latencies = Latencies::new();
    for _ in 0..MAX_CALLS_PER_TASK {
        let began = Instant::now();
        if began >= end {
            break;
        }
        target.call_once().await?;
        all += 1;
        let done = Instant::now();
        if done >= start && done <= end {
            completed += 1;
            if began >= start {
                latencies.record(done - began);
            }
        }
    }
    Ok((completed, all, latencies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_in_microseconds() {
        let mut l = Latencies::new();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.count(), 100);
        assert!(
            (l.quantile_us(0.5) - 50.0).abs() < 0.1,
            "{}",
            l.quantile_us(0.5)
        );
        assert!((l.quantile_us(0.99) - 99.0).abs() < 0.1);
        assert!((l.mean_us() - 50.5).abs() < 0.1);
        let mut m = Latencies::new();
        m.merge(&l);
        m.merge(&l);
        assert_eq!(m.count(), 200);
    }

    #[test]
    fn the_echo_shape_is_checked() {
        let args = echo_arguments();
        let good = super::super::baseline::echo_response(args.clone(), "x");
        check_echo(&good, &args).expect("echo shape");
        let mut bad = good.clone();
        bad.structured_content = None;
        assert!(check_echo(&bad, &args).is_err());
        let mut bad = good;
        bad.is_error = true;
        assert!(check_echo(&bad, &args).is_err());
    }

    #[tokio::test]
    async fn sequential_stops_at_the_count() {
        let mut calls = 0;
        let l = sequential("t", 2, 5, Duration::from_secs(5), || {
            calls += 1;
            async { Ok(()) }
        })
        .await
        .expect("runs");
        assert_eq!((calls, l.count()), (7, 5));
    }
}
