//! What observability costs: routed `echo` throughput on a cluster exporting traces to an OTLP
//! receiver (run here, in heistctl) and scraped on `/metrics` each round, against a cluster with
//! both off (no exporter, `HEIST_TELEMETRY=false`). The traced cluster samples as a deployment
//! does by default (new traces capped at HEIST_TRACES_PER_SECOND); OTEL_TRACES_SAMPLER in
//! heistctl's environment, which the clusters inherit, measures another sampler
//! (`parentbased_always_on`: every call). Both clusters run side by side and are loaded in
//! alternating rounds (the order flips every round), so drift in the machine's speed hits both;
//! the phase reports the median of the per-round ratios.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::{Status, transport::server::TcpIncoming};

use super::{
    failed,
    paired::{Pair, env},
    phases::{Lab, Phase, count_f64},
    report::Metric,
};
use crate::{cluster::LocalCluster, error::Error};

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
    let pair = Pair::start(
        lab,
        "telemetry",
        vec![env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
        vec![env("HEIST_TELEMETRY", "false")],
    )
    .await;
    let result = match pair {
        Ok(pair) => {
            let result = rounds(lab, &pair, &receiver).await;
            pair.stop().await.and(result)
        }
        Err(err) => Err(err),
    };
    server.abort();
    result
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

async fn rounds(lab: &Lab, pair: &Pair, receiver: &Receiver) -> Result<Vec<Metric>, Error> {
    let mut rounds = pair
        .alternate(lab, "telemetry", async |pair: &Pair| {
            scrape(&pair.on.cluster).await.map(drop)
        })
        .await?;
    let spans = receiver.spans.load(Ordering::Relaxed);
    if spans == 0 {
        return Err(failed(
            "the OTLP receiver got no span: the 'on' cluster did not export",
        ));
    }
    let mut metrics = rounds.metrics("traces exported + metrics, median", "both off, median");
    metrics.push(Metric::new(
        "spans_received",
        "spans the receiver got",
        count_f64(spans),
        "spans",
    ));
    Ok(metrics)
}
