//! What observability costs: routed `echo` throughput on a cluster exporting every span to an
//! OTLP receiver (run here, in heistctl) and scraped on `/metrics` each round, against a cluster
//! with both off (no exporter, `HEIST_TELEMETRY=false`). Both clusters run side by side and are
//! loaded in alternating rounds (the order flips every round), so drift in the machine's speed
//! hits both; the phase reports the median of the per-round ratios.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::{Status, transport::server::TcpIncoming};

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

/// On/off round pairs (`--quick`: 2).
const ROUNDS: usize = 5;

/// The telemetry phase.
pub struct Telemetry;

impl Phase for Telemetry {
    fn name(&self) -> &'static str {
        "telemetry"
    }

    fn title(&self) -> &'static str {
        "routed echo throughput, traces exported + metrics scraped vs both off"
    }

    fn run<'a>(&'a self, lab: &'a mut Lab) -> BoxFuture<'a, Result<Vec<Metric>, Error>> {
        Box::pin(measure(lab))
    }
}

/// An OTLP/gRPC trace receiver (`TraceService/Export`) that counts the spans it gets. It reads
/// an export request only as far as its spans, leaving each one undecoded, the way a collector
/// that forwards spans does: the receiver shares the machine's CPUs with both clusters, so a
/// full decode of every attribute would be charged to the "on" cluster.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicU64>,
}

/// `ExportTraceServiceRequest` down to its spans (field numbers from the OTLP protobuf
/// definitions; the fields not named here are skipped by the decoder).
#[derive(Clone, PartialEq, prost::Message)]
struct ExportRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<bytes::Bytes>,
}

/// `ExportResponse` with no partial-success report: every span was taken.
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {}

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl tonic::server::NamedService for Receiver {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<ExportRequest> for Receiver {
    type Response = ExportResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, Status>>;

    fn call(&mut self, request: tonic::Request<ExportRequest>) -> Self::Future {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        std::future::ready(Ok(tonic::Response::new(ExportResponse::default())))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Receiver {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let receiver = self.clone();
        Box::pin(async move {
            if request.uri().path() != EXPORT {
                return Ok(Status::unimplemented("only TraceService/Export is served").into_http());
            }
            let codec = tonic_prost::ProstCodec::<ExportResponse, ExportRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .unary(receiver, request)
                .await)
        })
    }
}

async fn measure(lab: &mut Lab) -> Result<Vec<Metric>, Error> {
    let receiver = Receiver::default();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| failed(format!("cannot bind the OTLP receiver: {e}")))?;
    let endpoint = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| failed(format!("OTLP receiver address: {e}")))?
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(receiver.clone())
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let on = start(
        lab,
        "on",
        vec![env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    )
    .await?;
    let off = match start(lab, "off", vec![env("HEIST_TELEMETRY", "false")]).await {
        Ok(off) => off,
        Err(err) => {
            on.0.stop().await?;
            return Err(err);
        }
    };
    let result = rounds(lab, &on, &off, &receiver).await;
    for (cluster, dir) in [on, off] {
        cluster.stop().await?;
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%err, dir = %dir.display(), "cannot remove the bench data directory");
        }
    }
    server.abort();
    result
}

fn env(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

/// A one-worker cluster with `vars` in its environment, and its data directory.
async fn start(
    lab: &Lab,
    name: &str,
    vars: Vec<(String, String)>,
) -> Result<(LocalCluster, std::path::PathBuf), Error> {
    let data_dir = std::env::temp_dir().join(format!(
        "heist-bench-telemetry-{name}-{}",
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
        env: vars,
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

/// `GET /metrics` of the coordinator with the cluster's token; the body's length.
async fn scrape(cluster: &LocalCluster) -> Result<usize, Error> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let url = cluster.coordinator_url();
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(format!("cannot scrape {url}: {e}")))?;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        cluster.access_token()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| failed(format!("cannot scrape {url}: {e}")))?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .map_err(|e| failed(format!("cannot scrape {url}: {e}")))?;
    if !body.starts_with(b"HTTP/1.1 200") {
        return Err(failed(format!(
            "/metrics of {url} answered {}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        )));
    }
    Ok(body.len())
}

async fn rounds(
    lab: &Lab,
    on: &(LocalCluster, std::path::PathBuf),
    off: &(LocalCluster, std::path::PathBuf),
    receiver: &Receiver,
) -> Result<Vec<Metric>, Error> {
    let s = &lab.settings;
    let (on_target, off_target) = (
        target(&on.0, s.call_timeout()).await?,
        target(&off.0, s.call_timeout()).await?,
    );
    let (mut on_rates, mut off_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = if s.quick { 2 } else { ROUNDS };
    for round in 0..rounds {
        super::progress(&format!(
            "telemetry: round {}/{rounds}, {} calls in flight for {:.1} s per side",
            round + 1,
            s.concurrency,
            s.throughput().as_secs_f64()
        ));
        let rate = async |t: &EchoTarget| {
            load::throughput(t, s.concurrency, s.throughput_warmup(), s.throughput())
                .await
                .map(|t| t.per_second())
        };
        let (a, b) = if round % 2 == 0 {
            let a = rate(&on_target).await?;
            (a, rate(&off_target).await?)
        } else {
            let b = rate(&off_target).await?;
            (rate(&on_target).await?, b)
        };
        scrape(&on.0).await?;
        on_rates.push(a);
        off_rates.push(b);
        ratios.push(a / b);
    }
    let spans = receiver.spans.load(Ordering::Relaxed);
    if spans == 0 {
        return Err(failed(
            "the OTLP receiver got no span: the 'on' cluster did not export",
        ));
    }
    Ok(vec![
        Metric::new(
            "on_calls_per_s",
            "traces exported + metrics, median",
            median(&mut on_rates),
            "calls/s",
        ),
        Metric::new(
            "off_calls_per_s",
            "both off, median",
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
            "spans_received",
            "spans the receiver got",
            spans as f64,
            "spans",
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
