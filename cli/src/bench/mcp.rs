//! The MCP phase: `tools/call` of `echo` on the coordinator's `/mcp` (JSON-RPC over HTTP/1.1
//! with keep-alive, and over HTTP/2 without TLS) against gRPC CallTool of `echo`, all in the same
//! session of the same cluster in the same run. The report prints MCP / gRPC ratios.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{
    failed,
    load::{self, EchoTarget, Target, echo_arguments},
    phases::{Lab, Phase},
    report::Metric,
    settings::Settings,
};
use crate::{error::Error, mcp::McpHttp};

/// `echo` over MCP and over gRPC.
pub struct Mcp;

/// Metric names per transport: (p50, p99, throughput).
const NAMES: [(&str, &str, &str, &str); 3] = [
    (
        "grpc",
        "grpc_seq_p50_us",
        "grpc_seq_p99_us",
        "grpc_tput_calls_per_s",
    ),
    (
        "h1",
        "h1_seq_p50_us",
        "h1_seq_p99_us",
        "h1_tput_calls_per_s",
    ),
    (
        "h2",
        "h2_seq_p50_us",
        "h2_seq_p99_us",
        "h2_tput_calls_per_s",
    ),
];

/// `tools/call` of `echo` in one session.
#[derive(Clone, Debug)]
struct McpTarget {
    http: McpHttp,
    params: Value,
}

impl McpTarget {
    fn new(url: &str, token: &str, session: &str, http2: bool) -> Result<Self, Error> {
        let mut arguments = heist_proto::json::struct_to_map(&echo_arguments());
        arguments.insert("session_id".to_owned(), Value::String(session.to_owned()));
        Ok(Self {
            http: McpHttp::new(url, token.to_owned(), http2)?,
            params: json!({"name": "echo", "arguments": arguments}),
        })
    }

    async fn call(&self) -> Result<Value, Error> {
        match self
            .http
            .request(1, "tools/call", self.params.clone(), None)
            .await?
        {
            Ok(result) if result.get("isError") != Some(&Value::Bool(true)) => Ok(result),
            Ok(result) => Err(failed(format!("MCP echo failed: {result}"))),
            Err(error) => Err(failed(format!("MCP echo refused: {error}"))),
        }
    }

    /// One call, checking the structured result is the echo of its arguments.
    async fn verify(&self) -> Result<(), Error> {
        let result = self.call().await?;
        let expected = heist_proto::json::struct_to_json(&echo_arguments());
        if result.get("structuredContent") != Some(&expected) {
            return Err(failed(format!("MCP echo returned {result}")));
        }
        Ok(())
    }
}

impl Target for McpTarget {
    async fn call_once(&self) -> Result<(), Error> {
        self.call().await.map(drop)
    }
}

/// p50 and p99 of sequential calls and throughput with `concurrency` in flight.
async fn measure<T: Target>(
    names: (&'static str, &'static str, &'static str, &'static str),
    target: &T,
    s: &Settings,
) -> Result<Vec<Metric>, Error> {
    let (what, p50, p99, tput) = names;
    super::progress(&format!("mcp/{what}: {} sequential calls", s.calls));
    let seq = load::sequential(what, s.warmup_calls, s.calls, s.loop_cap(), || {
        target.call_once()
    })
    .await?;
    super::progress(&format!("mcp/{what}: {} calls in flight", s.concurrency));
    let load =
        load::throughput(target, s.concurrency, s.throughput_warmup(), s.throughput()).await?;
    Ok(vec![
        Metric::new(p50, "sequential p50", seq.quantile_us(0.5), "us"),
        Metric::new(p99, "sequential p99", seq.quantile_us(0.99), "us"),
        Metric::new(tput, "throughput", load.per_second(), "calls/s"),
    ])
}

impl Phase for Mcp {
    fn name(&self) -> &'static str {
        "mcp"
    }

    fn title(&self) -> &'static str {
        "echo via MCP tools/call (HTTP/1.1, HTTP/2) vs gRPC CallTool, same session"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(async move {
            let settings = lab.settings.clone();
            let cluster = lab.cluster().await?;
            let client = cluster.client().await?;
            let session = client
                .create_session(Default::default(), &uuid::Uuid::new_v4().to_string())
                .await?;
            let (url, token) = (cluster.coordinator_url(), cluster.access_token());
            let grpc =
                EchoTarget::connect(url, Some(token), &session.id, settings.call_timeout()).await?;
            grpc.verify().await?;
            let h1 = McpTarget::new(url, token, &session.id, false)?;
            h1.verify().await?;
            let h2 = McpTarget::new(url, token, &session.id, true)?;
            h2.verify().await?;
            let mut metrics = measure(NAMES[0], &grpc, &settings).await?;
            metrics.extend(measure(NAMES[1], &h1, &settings).await?);
            metrics.extend(measure(NAMES[2], &h2, &settings).await?);
            client
                .close_session(&session.id, &uuid::Uuid::new_v4().to_string())
                .await?;
            Ok(metrics)
        })
    }
}
