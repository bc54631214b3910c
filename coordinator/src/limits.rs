//! Per-principal limits on the public API: a token bucket (calls per second plus a burst) and
//! caps on what one principal has open at once, as a tower layer just inside [`AuthLayer`]
//! (which put the [`Principal`] on the request).
//!
//! - Only calls with a verified principal are limited: the allow-listed paths (IssueToken,
//!   which has its own throttle in [`crate::throttle`], health, reflection, probes, `/metrics`,
//!   the OAuth documents) and the worker-internal services (WorkerControl, BlobService) carry
//!   none and pass untouched.
//! - Every admitted call takes one token from its principal's bucket.
//! - A call holds one of its principal's call slots (HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS)
//!   until its response has been sent. A gRPC server-streaming call (RunTurn, WatchTurn,
//!   CallToolStream, TailAudit, the heist streams) holds a stream slot instead
//!   (HEIST_PRINCIPAL_MAX_OPEN_STREAMS) for as long as it is open, so a client watching turns
//!   is never locked out of unary calls by its own watchers, and cannot open streams without
//!   bound either. An MCP request (`/mcp`) is one call, streamed progress or not.
//! - Over a limit: gRPC RESOURCE_EXHAUSTED (reason LIMIT_EXCEEDED, metadata `limit`, a
//!   google.rpc.RetryInfo and a `retry-after` value in seconds); plain HTTP (`/mcp`) 429 with
//!   `Retry-After`. Nothing runs, so nothing changes.
//! - Principals are spread over shards, each behind its own mutex held for a few arithmetic
//!   operations, so one principal at its limit does not slow another. A principal with nothing
//!   in flight and a full bucket carries no information and is evicted when its shard grows.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _, ready};
use http_body_util::BodyExt as _;
use prometheus_client::metrics::{counter::Counter, family::Family};
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::debug;

use crate::{auth_layer::Principal, error::Error, metrics::LimitLabel};

#[cfg(doc)]
use crate::auth_layer::AuthLayer;

/// Shards of the principal table (a power of two).
const SHARDS: usize = 16;
/// Entries a shard holds before idle ones are swept on the next new principal.
const SWEEP_AT: usize = 256;
/// The retry advice when a principal has every call slot in use: calls are short.
const CALL_SLOT_RETRY: Duration = Duration::from_millis(100);
/// The retry advice when a principal has every stream slot in use: streams are long.
const STREAM_SLOT_RETRY: Duration = Duration::from_secs(1);

/// The per-principal limits (see docs/OPERATIONS.md, "Limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Calls per second one principal may make, sustained. HEIST_PRINCIPAL_CALLS_PER_S,
    /// default 50000.
    pub calls_per_s: u32,
    /// Calls one principal may make at once above the sustained rate (the bucket's size).
    /// HEIST_PRINCIPAL_CALL_BURST, default 100000.
    pub burst: u32,
    /// Calls one principal may have in flight (streams not counted).
    /// HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS, default 512.
    pub max_concurrent_calls: u32,
    /// Server-streaming calls one principal may have open. HEIST_PRINCIPAL_MAX_OPEN_STREAMS,
    /// default 256.
    pub max_open_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            calls_per_s: 50_000,
            burst: 100_000,
            max_concurrent_calls: 512,
            max_open_streams: 256,
        }
    }
}

impl LimitsConfig {
    /// Checks the limits; the error names the variable to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.calls_per_s == 0 || self.burst == 0 {
            return Err(
                "HEIST_PRINCIPAL_CALLS_PER_S and HEIST_PRINCIPAL_CALL_BURST must be at least 1"
                    .to_owned(),
            );
        }
        if self.max_concurrent_calls == 0 || self.max_open_streams == 0 {
            return Err(
                "HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS and HEIST_PRINCIPAL_MAX_OPEN_STREAMS \
                        must be at least 1"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Which limit refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The token bucket was empty.
    Rate,
    /// Every call slot was in use.
    ConcurrentCalls,
    /// Every stream slot was in use.
    OpenStreams,
}

impl Limit {
    /// The name in the error's `limit` metadata and the metric's label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::ConcurrentCalls => "concurrent_calls",
            Limit::OpenStreams => "open_streams",
        }
    }
}

/// A call refused by a limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Which limit.
    pub limit: Limit,
    /// Whose.
    pub principal: String,
    /// When a retry may succeed.
    pub retry_after: Duration,
    /// The limits in force.
    config: LimitsConfig,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (who, c, ms) = (&self.principal, &self.config, self.retry_after.as_millis());
        match self.limit {
            Limit::Rate => write!(
                f,
                "client {who} is over its rate limit of {} calls/s (burst {}): retry in {ms} ms \
                 and slow down, or have the operator raise HEIST_PRINCIPAL_CALLS_PER_S",
                c.calls_per_s, c.burst
            ),
            Limit::ConcurrentCalls => write!(
                f,
                "client {who} already has {} calls in flight, its limit: wait for one to finish \
                 and retry in {ms} ms, or have the operator raise \
                 HEIST_PRINCIPAL_MAX_CONCURRENT_CALLS",
                c.max_concurrent_calls
            ),
            Limit::OpenStreams => write!(
                f,
                "client {who} already has {} streams open, its limit: close one (a turn or tail \
                 it no longer watches) and retry, or have the operator raise \
                 HEIST_PRINCIPAL_MAX_OPEN_STREAMS",
                c.max_open_streams
            ),
        }
    }
}

impl Refusal {
    /// `retry_after` in whole seconds, at least 1 (the HTTP `Retry-After` form).
    pub fn retry_after_s(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// One principal's state.
struct Entry {
    tokens: f64,
    refilled: Instant,
    calls: Arc<AtomicU32>,
    streams: Arc<AtomicU32>,
}

/// One occupied call or stream slot, released when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The per-principal table and the decision.
pub struct Limiter {
    config: LimitsConfig,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, Entry>>>,
}

impl Limiter {
    /// A limiter enforcing `config`.
    pub fn new(config: LimitsConfig) -> Self {
        Self {
            config,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Admits one call of `principal` now (a stream slot when `stream`, else a call slot and
    /// a token), or says which limit refuses it. A refused call takes nothing.
    pub fn admit(&self, principal: &str, stream: bool) -> Result<Slot, Refusal> {
        let now = Instant::now();
        let c = self.config;
        let shard = &self.shards[self.hasher.hash_one(principal) as usize % SHARDS];
        let mut entries = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= SWEEP_AT && !entries.contains_key(principal) {
            entries.retain(|_, e| !self.idle(e, now));
        }
        let entry = entries
            .entry(principal.to_owned())
            .or_insert_with(|| Entry {
                tokens: f64::from(c.burst),
                refilled: now,
                calls: Arc::default(),
                streams: Arc::default(),
            });
        let refuse = |limit, retry_after| Refusal {
            limit,
            principal: principal.to_owned(),
            retry_after,
            config: c,
        };
        let (slots, max, limit, retry) = if stream {
            (
                &entry.streams,
                c.max_open_streams,
                Limit::OpenStreams,
                STREAM_SLOT_RETRY,
            )
        } else {
            (
                &entry.calls,
                c.max_concurrent_calls,
                Limit::ConcurrentCalls,
                CALL_SLOT_RETRY,
            )
        };
        // Slots are taken only under the shard's lock, so a sweep never sees a slot that is
        // about to be taken; releasing one needs no lock.
        if slots.load(Ordering::Acquire) >= max {
            return Err(refuse(limit, retry));
        }
        let rate = f64::from(c.calls_per_s);
        let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * rate).min(f64::from(c.burst));
        entry.refilled = now;
        if entry.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - entry.tokens) / rate);
            return Err(refuse(Limit::Rate, wait.max(Duration::from_millis(1))));
        }
        entry.tokens -= 1.0;
        slots.fetch_add(1, Ordering::AcqRel);
        Ok(Slot(Arc::clone(slots)))
    }

    /// Whether forgetting `entry` loses nothing: no slot in use and a bucket that has refilled.
    fn idle(&self, entry: &Entry, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
        entry.calls.load(Ordering::Acquire) == 0
            && entry.streams.load(Ordering::Acquire) == 0
            && entry.tokens + elapsed * f64::from(self.config.calls_per_s)
                >= f64::from(self.config.burst)
    }

    /// Principals with state held now (for tests of eviction).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// The gRPC paths whose responses are streams (`/pkg.Service/Method`), read from the
/// descriptors the server serves, so a new streaming method is known without a list to edit.
pub fn streaming_paths() -> HashSet<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(heist_proto::FILE_DESCRIPTOR_SET) else {
        return HashSet::new();
    };
    let mut paths = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.server_streaming() {
                    paths.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    paths
}

/// Layer wrapping the server in [`LimitMiddleware`].
#[derive(Clone)]
pub struct LimitLayer {
    limiter: Arc<Limiter>,
    streaming: Arc<HashSet<String>>,
    refused: Family<LimitLabel, Counter>,
}

impl LimitLayer {
    /// A layer enforcing `config`, counting refusals in `refused`.
    pub fn new(config: LimitsConfig, refused: Family<LimitLabel, Counter>) -> Self {
        Self {
            limiter: Arc::new(Limiter::new(config)),
            streaming: Arc::new(streaming_paths()),
            refused,
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = LimitMiddleware<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitMiddleware {
            inner,
            layer: self.clone(),
        }
    }
}

/// Admits or refuses each call of a verified principal; see the module docs.
#[derive(Clone)]
pub struct LimitMiddleware<S> {
    inner: S,
    layer: LimitLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for LimitMiddleware<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Some(principal) = request.extensions().get::<Principal>() else {
            return self
                .inner
                .call(request)
                .map(|r| r.map(|r| r.map(Body::new)))
                .boxed();
        };
        let stream = self.layer.streaming.contains(request.uri().path());
        match self.layer.limiter.admit(&principal.id, stream) {
            Ok(slot) => self
                .inner
                .call(request)
                .map(|result| {
                    // The slot lives in the response body, so it is held until the last byte
                    // is sent (or the client goes away).
                    result.map(|response| {
                        response.map(|body| {
                            Body::new(body.map_frame(move |frame| {
                                let _held = &slot;
                                frame
                            }))
                        })
                    })
                })
                .boxed(),
            Err(refusal) => {
                debug!(
                    principal = %refusal.principal,
                    limit = refusal.limit.name(),
                    path = request.uri().path(),
                    "call refused: over a per-principal limit"
                );
                self.layer
                    .refused
                    .get_or_create(&LimitLabel {
                        limit: refusal.limit.name().to_owned(),
                    })
                    .inc();
                ready(Ok(refused(&request, refusal))).boxed()
            }
        }
    }
}

/// The answer to a refused call: RESOURCE_EXHAUSTED with retry info for gRPC, 429 with
/// `Retry-After` and the message as text for plain HTTP.
fn refused<B>(request: &http::Request<B>, refusal: Refusal) -> http::Response<Body> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return Status::from(Error::Limited(refusal)).into_http();
    }
    let retry_after = http::HeaderValue::from(refusal.retry_after_s());
    let mut response = http::Response::new(Body::new(format!("{refusal}\n")));
    *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(http::header::RETRY_AFTER, retry_after);
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(calls_per_s: u32, burst: u32, calls: u32, streams: u32) -> Limiter {
        Limiter::new(LimitsConfig {
            calls_per_s,
            burst,
            max_concurrent_calls: calls,
            max_open_streams: streams,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_empties_and_refills_at_the_rate() {
        let l = limiter(10, 3, 100, 100);
        for _ in 0..3 {
            drop(l.admit("alice", false).expect("within the burst"));
        }
        let refusal = l.admit("alice", false).expect_err("bucket empty");
        assert_eq!(refusal.limit, Limit::Rate);
        assert_eq!(refusal.retry_after, Duration::from_millis(100));
        assert_eq!(refusal.retry_after_s(), 1);
        assert!(refusal.to_string().contains("HEIST_PRINCIPAL_CALLS_PER_S"));
        // Another principal has its own bucket.
        drop(l.admit("bob", false).expect("bob is not alice"));
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(l.admit("alice", false).expect("one token back"));
        assert_eq!(
            l.admit("alice", false).expect_err("empty again").limit,
            Limit::Rate
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_held_until_dropped_and_streams_have_their_own() {
        let l = limiter(1000, 1000, 2, 1);
        let a = l.admit("alice", false).expect("first call");
        let _b = l.admit("alice", false).expect("second call");
        let refusal = l.admit("alice", false).expect_err("two in flight");
        assert_eq!(refusal.limit, Limit::ConcurrentCalls);
        assert_eq!(refusal.retry_after, CALL_SLOT_RETRY);
        // A stream is not a call, and its cap is separate.
        let _s = l.admit("alice", true).expect("a stream");
        assert_eq!(
            l.admit("alice", true).expect_err("one stream open").limit,
            Limit::OpenStreams
        );
        drop(a);
        drop(l.admit("alice", false).expect("a slot freed"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_call_takes_no_token() {
        let l = limiter(1, 2, 1, 1);
        let held = l.admit("alice", false).expect("call");
        for _ in 0..10 {
            l.admit("alice", false).expect_err("slot in use");
        }
        drop(held);
        drop(
            l.admit("alice", false)
                .expect("the second token is still there"),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_principals_are_evicted_busy_ones_kept() {
        let l = limiter(1000, 1, 1, 10);
        let many = SHARDS * SWEEP_AT * 2;
        let _busy = l.admit("busy", false).expect("call");
        for i in 0..many {
            drop(l.admit(&format!("p{i}"), false).expect("call"));
        }
        // Each of those spent its only token, which is information: nothing was forgotten.
        assert_eq!(l.tracked(), many + 1);
        // Once their buckets have refilled they are idle, and new principals sweep them out.
        tokio::time::advance(Duration::from_millis(10)).await;
        for i in 0..many {
            drop(l.admit(&format!("q{i}"), false).expect("call"));
        }
        assert_eq!(
            l.tracked(),
            many + 1,
            "only the q's and the busy one are left"
        );
        // The busy one kept its state: its slot is still counted.
        assert_eq!(
            l.admit("busy", false).expect_err("its slot is held").limit,
            Limit::ConcurrentCalls
        );
    }

    #[test]
    fn streaming_methods_come_from_the_descriptors() {
        let paths = streaming_paths();
        for path in [
            "/heist.v1.AgentService/RunTurn",
            "/heist.v1.AgentService/WatchTurn",
            "/heist.v1.ToolService/CallToolStream",
            "/heist.v1.AuditService/TailAudit",
        ] {
            assert!(paths.contains(path), "{path}");
        }
        assert!(!paths.contains("/heist.v1.ToolService/CallTool"));
        assert!(!paths.contains("/heist.v1.SessionService/CreateSession"));
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(LimitsConfig::default().validate().is_ok());
        let zero = LimitsConfig {
            max_open_streams: 0,
            ..LimitsConfig::default()
        };
        let err = zero.validate().expect_err("zero");
        assert!(err.contains("HEIST_PRINCIPAL_MAX_OPEN_STREAMS"), "{err}");
    }
}
