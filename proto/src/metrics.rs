//! Prometheus metrics both binaries share: the registry helpers, the RPC metrics
//! [`crate::trace::RpcLayer`] records, and the `/metrics` bearer check.
//!
//! Each server owns its [`Registry`] (no global registry: tests run several servers in one
//! process). Every label set is bounded: method paths of known shapes, status codes, tool
//! names from the catalogue, providers and models from the configuration; never session ids.

use std::{borrow::Cow, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

pub use prometheus_client;

/// The `Content-Type` of `/metrics` (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A family of histograms built by a plain function.
pub type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// Latency buckets in seconds: 0.5 ms to about 33 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 17,
    ))
}

/// Size buckets in bytes: 1 KiB to 4 GiB, ×4.
pub fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1024.0, 4.0, 12,
    ))
}

/// A latency histogram family.
pub fn latency_family<S: Clone + std::hash::Hash + Eq>() -> Histograms<S> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(%err, "cannot encode the metrics");
    }
    out
}

/// Labels: a method and the code it answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    /// gRPC path or HTTP route (see [`crate::trace::method_label`]).
    pub method: &'static str,
    /// gRPC code name or HTTP status.
    pub code: Cow<'static, str>,
}

/// Labels: a method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    /// gRPC path or HTTP route.
    pub method: &'static str,
}

/// Labels: why a request was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The ErrorInfo reason (`TOKEN_INVALID`, ...) or the code.
    pub reason: String,
}

/// Calls answered by a server, their latency, and refusals.
pub struct RpcMetrics {
    requests: Family<MethodCode, Counter>,
    duration: Histograms<Method>,
    refusals: Family<Reason, Counter>,
}

impl RpcMetrics {
    /// Registers `heist_rpc_requests_total`, `heist_rpc_duration_seconds` and
    /// `heist_auth_refusals_total` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            requests: Family::default(),
            duration: latency_family(),
            refusals: Family::default(),
        };
        registry.register(
            "heist_rpc_requests",
            "Calls answered, by method and code",
            this.requests.clone(),
        );
        registry.register(
            "heist_rpc_duration_seconds",
            "Time to the head of the response (the whole call for unary RPCs), by method",
            this.duration.clone(),
        );
        registry.register(
            "heist_auth_refusals",
            "Calls refused for want of a valid token or scope, by reason",
            this.refusals.clone(),
        );
        this
    }

    /// Records one answered call.
    pub fn observe(&self, method: &'static str, code: Cow<'static, str>, elapsed: Duration) {
        self.requests
            .get_or_create(&MethodCode { method, code })
            .inc();
        self.duration
            .get_or_create(&Method { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a refusal.
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
