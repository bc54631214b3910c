//! W3C trace context on the wire, and [`RpcLayer`]: the span and metrics of every call a server
//! answers.
//!
//! - Incoming: `traceparent`/`tracestate` in gRPC metadata (HTTP headers) become the parent of
//!   the call's span ([`extract`]).
//! - Outgoing: [`inject`] writes the current span's context into a request's metadata (the
//!   coordinator does it for every call to a worker; heistctl for every call it makes).
//! - Back to the client: every response carries `x-trace-id` ([`TRACE_ID_HEADER`]) when the
//!   call belongs to a sampled trace (one that is recorded), so a client can look it up.
//!
//! Each call's own span (the one span a routed call exports on each hop) is made by
//! [`RpcLayer`] with the OpenTelemetry SDK directly, not as a `tracing` span: it is the only span
//! on the hot path, and the `tracing` bridge (a registry entry, a span builder and per-poll
//! callbacks) cost more than the span itself. Its context is attached to the call's future
//! (`Context::current()` while it runs), so the `tracing` spans made inside the call parent to it
//! through the OpenTelemetry layer, and [`inject`] sends it on. The call also has a `tracing`
//! span for its log lines (`trace_id`, `method`), never exported.
//!
//! Spans are only made while a trace pipeline is installed (an OTLP endpoint is set, see
//! [`crate::logging`]); otherwise a client's `traceparent` still names the trace id on the
//! call's log lines and in `x-trace-id`, and nothing else is done.

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    context::FutureExt as _,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{SpanKind, Status, TraceContextExt as _, TraceId, Tracer as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracer};
use tonic::metadata::{AsciiMetadataValue, MetadataKey, MetadataMap};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field::Empty, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::RpcMetrics;

/// A boxed, sendable future (the response future of [`RpcService`]).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Response header naming the trace a call belongs to (32 lowercase hex digits).
pub const TRACE_ID_HEADER: &str = "x-trace-id";
/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing (W3C Trace Context §3.3.1): not sent.
        if value.is_empty() {
            return;
        }
        if let (Ok(key), Ok(mut value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            AsciiMetadataValue::try_from(value),
        ) {
            // A traceparent names a new span on every call: HPACK sends it never indexed, so
            // it does not push the headers that do repeat out of the connection's table.
            value.set_sensitive(key.as_str() == TRACEPARENT);
            self.0.insert(key, value);
        }
    }
}

/// The trace context in `headers` (`traceparent`, `tracestate`); an empty context when absent
/// or malformed.
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace context of a `traceparent` value (as in the TRACEPARENT environment variable).
pub fn from_traceparent(value: &str) -> Context {
    from_w3c(value, None)
}

/// The trace context of a `traceparent` value and an optional `tracestate` (as MCP carries
/// them in a request's `_meta`); an empty context when the traceparent is malformed.
pub fn from_w3c(traceparent: &str, tracestate: Option<&str>) -> Context {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(traceparent.trim()) {
        headers.insert(TRACEPARENT, value);
    }
    if let Some(Ok(value)) = tracestate.map(|v| HeaderValue::from_str(v.trim())) {
        headers.insert("tracestate", value);
    }
    extract(&headers)
}

/// The trace id of a parsed context, if valid.
pub fn context_trace_id(cx: &Context) -> Option<TraceId> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id())
}

/// A trace id as 32 lowercase hex digits, without the formatting machinery (it is made for
/// every call: its log span and its `x-trace-id`).
fn trace_id_hex(id: TraceId) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(id.to_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    out
}

/// The `traceparent` a client process sends: the TRACEPARENT environment variable when it holds
/// a valid one (the process continues its caller's trace), else a new sampled trace.
pub fn process_traceparent() -> String {
    if let Ok(value) = std::env::var("TRACEPARENT")
        && context_trace_id(&from_traceparent(&value)).is_some()
    {
        return value.trim().to_owned();
    }
    let mut ids = [0u8; 24];
    if getrandom::fill(&mut ids).is_err() || ids[..16] == [0; 16] || ids[16..] == [0; 8] {
        // Unlikely; a fixed but valid pair beats no trace context.
        ids = [1; 24];
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&ids[..16]), hex(&ids[16..]))
}

/// The trace id (32 hex digits) of a `traceparent` value.
pub fn traceparent_trace_id(value: &str) -> Option<String> {
    context_trace_id(&from_traceparent(value)).map(|t| t.to_string())
}

/// Writes the context of `span` into `metadata`; when `span` is not exported (a call's log
/// span, or none), the current OpenTelemetry context (the call's own span, see [`RpcLayer`]).
/// Nothing when neither belongs to a trace.
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    let mut cx = span.context();
    if !cx.span().span_context().is_valid() {
        cx = Context::current();
    }
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// Writes the context of the current span into `metadata`.
pub fn inject_current(metadata: &mut MetadataMap) {
    inject(&Span::current(), metadata);
}

/// `future`, carrying the current `tracing` span and OpenTelemetry context: for a task spawned
/// to finish a call's work, so what it does stays in the call's trace.
pub fn in_current<F: Future>(future: F) -> impl Future<Output = F::Output> {
    future.instrument(Span::current()).with_current_context()
}

/// The trace id of `span`, if it belongs to a trace.
pub fn trace_id(span: &Span) -> Option<TraceId> {
    let id = span.context().span().span_context().trace_id();
    (id != TraceId::INVALID).then_some(id)
}

/// Makes `parent` the parent of `span` when it is a valid remote context.
pub fn set_parent(span: &Span, parent: Context) {
    if context_trace_id(&parent).is_some() {
        // Fails only when the span is disabled; then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The standard gRPC services served next to heist's own (health checks, reflection).
const GRPC_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A label for a request path that keeps the label set bounded: the path of a heist or
/// standard gRPC method ([`crate::RPC_METHODS`]) or of one of the few HTTP routes served; any
/// other path (an unknown method, a probe for one) is `other`.
pub fn method_label(path: &str, grpc: bool) -> &'static str {
    const HTTP: &[&str] = &[
        "/healthz",
        "/readyz",
        "/metrics",
        "/mcp",
        "/oauth/token",
        "/.well-known",
    ];
    if grpc {
        let known = crate::RPC_METHODS
            .binary_search(&path)
            .ok()
            .map(|i| crate::RPC_METHODS[i])
            .or_else(|| GRPC_METHODS.iter().copied().find(|m| *m == path));
        return known.unwrap_or("other");
    }
    HTTP.iter()
        .copied()
        .find(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .unwrap_or("other")
}

/// The target of the log spans [`RpcLayer`] makes (never exported: the call's exported span is
/// made with the SDK).
pub const RPC_SPAN_TARGET: &str = concat!(module_path!(), "::rpc");

/// The tracer [`RpcLayer`] makes each call's span with: set once, when the trace pipeline is
/// installed ([`set_rpc_tracer`]).
static RPC_TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Makes [`RpcLayer`] start a span per call with `tracer` (the first tracer a process installs
/// stays).
pub fn set_rpc_tracer(tracer: SdkTracer) {
    let _ = RPC_TRACER.set(tracer);
}

/// In the context of an RPC that runs one tool call: whether [`tool_call_span`] has named the
/// tool on the RPC's span yet.
struct ToolCallRpc(AtomicBool);

/// Whether log lines show the fields of [`RpcLayer`]'s spans (see [`set_logs_show_rpc_spans`]).
static LOGS_SHOW_RPC_SPANS: AtomicBool = AtomicBool::new(true);

/// Tells [`RpcLayer`] whether the log filter shows its spans. When it does not (LOG_LEVEL
/// `warn`), a span carries no `trace_id` field: no log line could show it, and a trace
/// exporter would only send it again as an attribute of every span.
pub fn set_logs_show_rpc_spans(shown: bool) {
    LOGS_SHOW_RPC_SPANS.store(shown, Ordering::Relaxed);
}

/// The name of the log span [`RpcLayer`] gives an RPC that is one tool call (`CallTool`,
/// `CallToolStream`): it has `tool` and `session_id` fields for [`tool_call_span`] to fill.
const TOOL_CALL_RPC_SPAN: &str = "rpc-tool-call";

/// Whether `method` (a [`method_label`]) is an RPC that runs one tool call.
fn is_tool_call(method: &str) -> bool {
    method.starts_with("/heist.v1.")
        && (method.ends_with("Service/CallTool") || method.ends_with("Service/CallToolStream"))
}

/// The span a tool call runs in. When the call is the RPC being answered (a gRPC `CallTool`
/// on the coordinator or a worker), the RPC's own span is the tool call's span: its `tool` and
/// `session_id` are set on it (and on its log span, which is returned), so a routed call costs
/// one span per hop. Otherwise (an MCP request, a heist game's step, an agent's tool call) a
/// new `tool_call` span, child of the current one.
pub fn tool_call_span(tool: &str, session_id: &str) -> Span {
    let current = Span::current();
    let logged = current
        .metadata()
        .is_some_and(|m| m.name() == TOOL_CALL_RPC_SPAN);
    if logged {
        current.record("tool", tool);
        current.record("session_id", session_id);
    }
    let cx = Context::current();
    let exported = cx
        .get::<ToolCallRpc>()
        .is_some_and(|named| !named.0.swap(true, Ordering::Relaxed));
    if exported {
        cx.span().set_attributes([
            KeyValue::new("tool", tool.to_owned()),
            KeyValue::new("session_id", session_id.to_owned()),
        ]);
    }
    if logged || exported {
        return current;
    }
    info_span!("tool_call", tool = %tool, session_id = %session_id)
}

/// Tower layer giving every request a span (a server span named after the method, parented by
/// the caller's trace context, when traces are exported; a log span with the trace id as a
/// field, so log lines carry it), recording it in [`RpcMetrics`], and answering
/// [`TRACE_ID_HEADER`] (unless told not to). Put it outermost, so refused calls are seen too.
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<RpcMetrics>,
    answer_trace_id: bool,
}

impl RpcLayer {
    /// A layer recording into `metrics` and answering [`TRACE_ID_HEADER`].
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        Self {
            metrics,
            answer_trace_id: true,
        }
    }

    /// No [`TRACE_ID_HEADER`] on responses: for a server whose only caller started the trace
    /// itself (a worker, called by the coordinator), where the header would be an extra
    /// uncompressible value on every response.
    pub fn without_trace_id_header(mut self) -> Self {
        self.answer_trace_id = false;
        self
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
            answer_trace_id: self.answer_trace_id,
        }
    }
}

/// The service [`RpcLayer`] wraps around a server.
#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
    answer_trace_id: bool,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let grpc = is_grpc(request.headers());
        let method = method_label(request.uri().path(), grpc);
        let parent = extract(request.headers());
        let tool_call = is_tool_call(method);
        // The call's exported span, child of the caller's when it sent a trace context, else
        // the root of a new trace.
        let otel = RPC_TRACER.get().map(|tracer| {
            let span = tracer
                .span_builder(method)
                .with_kind(SpanKind::Server)
                .start_with_context(tracer, &parent);
            let cx = parent.with_span(span);
            if tool_call {
                cx.with_value(ToolCallRpc(AtomicBool::new(false)))
            } else {
                cx
            }
        });
        let (trace, sampled) = {
            let cx = otel.as_ref().unwrap_or(&parent);
            let span = cx.span();
            let sc = span.span_context();
            let trace = sc.is_valid().then(|| trace_id_hex(sc.trace_id()));
            (trace, sc.is_sampled())
        };
        let logged = LOGS_SHOW_RPC_SPANS.load(Ordering::Relaxed);
        let known = trace
            .as_ref()
            .filter(|_| logged)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .map(tracing::field::display);
        let span = if tool_call {
            info_span!(
                target: RPC_SPAN_TARGET,
                TOOL_CALL_RPC_SPAN,
                method,
                trace_id = known,
                tool = Empty,
                session_id = Empty,
            )
        } else {
            info_span!(target: RPC_SPAN_TARGET, "rpc", method, trace_id = known)
        };
        // The standard swap: call the clone that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        // Only a trace that is recorded can be found: an unsampled call names none.
        let answer = trace.filter(|_| self.answer_trace_id && sampled);
        let started = Instant::now();
        // The inner layers' own `call` runs in the call's context too, as its future will.
        let future = {
            let _attached = otel.clone().map(Context::attach);
            let _entered = span.enter();
            inner.call(request)
        };
        let ended = otel.clone();
        let answered = async move {
            let mut result = future.await;
            if let Ok(response) = &mut result {
                let (code, number) = response_code(response.status(), response.headers(), grpc);
                if let Some(cx) = &ended {
                    end_span(cx, grpc, &code, number);
                }
                metrics.observe(method, code.clone(), started.elapsed());
                if let Some(reason) = refusal_reason(response.headers(), &code) {
                    metrics.refused(&reason);
                }
                if let Some(id) = answer
                    && let Ok(mut value) = HeaderValue::from_bytes(&id)
                {
                    // New on every trace: never indexed (see `MetadataInjector`).
                    value.set_sensitive(true);
                    response.headers_mut().insert(TRACE_ID_HEADER, value);
                }
            }
            // A call that failed in transport or was dropped: its span ends when the last
            // reference to its context goes.
            result
        }
        .instrument(span);
        match otel {
            Some(cx) => Box::pin(answered.with_context(cx)),
            None => Box::pin(answered),
        }
    }
}

/// Ends a call's span with its outcome: the status as a number (as the semantic conventions
/// have it, `rpc.grpc.status_code` or `http.response.status_code`), and an error status for
/// the codes that mean the server failed (gRPC: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
/// INTERNAL, UNAVAILABLE, DATA_LOSS; HTTP: 5xx).
fn end_span(cx: &Context, grpc: bool, code: &str, number: i64) {
    let span = cx.span();
    let (field, failed) = if grpc {
        use tonic::Code;
        let code = i32::try_from(number).map_or(Code::Unknown, Code::from);
        (
            "rpc.grpc.status_code",
            matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ),
        )
    } else {
        ("http.response.status_code", number >= 500)
    };
    span.set_attribute(KeyValue::new(field, number));
    if failed {
        span.set_status(Status::error(code.to_owned()));
    }
    span.end();
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The call's outcome as a label and as a number: the gRPC code when the head of the response
/// carries `grpc-status` (an error answered at once), `OK` for a gRPC response that started
/// normally (a later error in the trailers of a stream is not seen here), the HTTP status
/// otherwise.
fn response_code(
    status: http::StatusCode,
    headers: &HeaderMap,
    grpc: bool,
) -> (Cow<'static, str>, i64) {
    if grpc {
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Ok, tonic::Code::from);
        return (Cow::Borrowed(code_name(code)), i64::from(i32::from(code)));
    }
    (
        Cow::Owned(status.as_u16().to_string()),
        i64::from(status.as_u16()),
    )
}

/// The canonical name of a gRPC code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Why a call was refused, for refusals of authentication (`UNAUTHENTICATED`, HTTP 401) or
/// authorisation (`PERMISSION_DENIED`, HTTP 403): the ErrorInfo reason when the status has one,
/// else the code.
fn refusal_reason(headers: &HeaderMap, code: &str) -> Option<String> {
    if !matches!(
        code,
        "UNAUTHENTICATED" | "PERMISSION_DENIED" | "401" | "403"
    ) {
        return None;
    }
    let reason = tonic::Status::from_header_map(headers)
        .and_then(|status| crate::errors::reason_of(&status))
        .filter(|r| r.len() <= 64 && r.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
    Some(reason.unwrap_or_else(|| code.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_injected_traceparent_is_never_indexed() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(value);
        let mut metadata = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut metadata));
        let sent = metadata.get(TRACEPARENT).expect("traceparent");
        assert_eq!(sent.to_str().expect("ascii"), value);
        assert!(sent.is_sensitive());
        assert!(
            metadata.get("tracestate").is_none(),
            "an empty tracestate is not sent"
        );
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/heist.v1.ToolService/CallTool", true),
            "/heist.v1.ToolService/CallTool"
        );
        assert_eq!(method_label("/evil.Service/X", true), "other");
        assert_eq!(method_label("/heist.v1.A/B/C", true), "other");
        // A well-formed path of a method that does not exist is not a label of its own (each
        // new label would be a new series, made by anyone who can reach the port).
        assert_eq!(
            method_label("/heist.v1.ToolService/CallTool2", true),
            "other"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check", true),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(
            method_label("/heist.v1.WorkerService/CaptureWorkspace", true),
            "/heist.v1.WorkerService/CaptureWorkspace"
        );
        assert!(crate::RPC_METHODS.windows(2).all(|w| w[0] < w[1]), "sorted");
        assert!(crate::RPC_METHODS.len() > 20, "{:?}", crate::RPC_METHODS);
        assert_eq!(method_label("/metricsX", false), "other");
        assert_eq!(method_label("/metrics", false), "/metrics");
        assert_eq!(method_label("/.well-known/x/y", false), "/.well-known");
        assert_eq!(method_label("/random", false), "other");
    }

    /// A server answering every request with the future its function makes.
    #[derive(Clone)]
    struct Answers<F>(F);

    type Answer = BoxFuture<Result<http::Response<()>, std::convert::Infallible>>;

    /// The RPC layer around an [`Answers`] server.
    type Traced = RpcService<Answers<fn() -> Answer>>;

    impl<F: Fn() -> Answer> Service<http::Request<()>> for Answers<F> {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = Answer;

        fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            (self.0)()
        }
    }

    /// The RPC layer around a server answering with `answer`, and a gRPC request to `path`
    /// from a caller in trace 4bf92f35... that samples it.
    fn traced(answer: fn() -> Answer, path: &str) -> (Traced, http::Request<()>) {
        traced_with(answer, path, "01")
    }

    /// [`traced`], with the caller's trace flags (`01` sampled, `00` not).
    fn traced_with(answer: fn() -> Answer, path: &str, flags: &str) -> (Traced, http::Request<()>) {
        let metrics = Arc::new(RpcMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ));
        let service = RpcLayer::new(metrics).layer(Answers(answer));
        let request = http::Request::builder()
            .uri(path)
            .header("content-type", "application/grpc")
            .header(
                TRACEPARENT,
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
            )
            .body(())
            .expect("request");
        (service, request)
    }

    /// Logs one line while it answers (in its response future, as tonic's handlers run).
    fn logs() -> Answer {
        Box::pin(async {
            tracing::info!("answering");
            Ok(http::Response::new(()))
        })
    }

    /// Log lines written to a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Calls the RPC layer around [`logs`] from a caller with trace `flags`; its log lines and
    /// its response.
    fn logged_call(flags: &str) -> (String, http::Response<()>) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let (mut service, request) =
            traced_with(logs, "/heist.v1.SessionService/GetSession", flags);
        let response = tracing::subscriber::with_default(subscriber, || {
            futures::executor::block_on(service.call(request))
        })
        .expect("response");
        let logs = String::from_utf8_lossy(
            &captured
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned();
        (logs, response)
    }

    #[test]
    fn log_lines_inside_a_call_carry_the_callers_trace_id() {
        let (logs, response) = logged_call("01");
        assert!(
            logs.contains("answering")
                && logs.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
            "{logs}"
        );
        assert_eq!(
            response
                .headers()
                .get(TRACE_ID_HEADER)
                .map(HeaderValue::as_bytes),
            Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..]),
            "the response names the trace"
        );
    }

    #[test]
    fn an_unsampled_call_logs_its_trace_id_but_names_no_trace() {
        let (logs, response) = logged_call("00");
        assert!(
            logs.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
            "its log lines still go together: {logs}"
        );
        assert!(
            response.headers().get(TRACE_ID_HEADER).is_none(),
            "no trace was recorded for a client to look up"
        );
    }

    #[test]
    fn trace_ids_are_written_as_the_standard_hex() {
        for id in [0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128, 1, u128::MAX] {
            let id = TraceId::from(id);
            assert_eq!(trace_id_hex(id).as_slice(), id.to_string().as_bytes());
        }
    }

    /// Spans kept in memory as the SDK ends them.
    #[derive(Clone, Debug, Default)]
    struct Kept(Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Kept {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(batch);
            Ok(())
        }
    }

    /// Fails with INTERNAL in the head of its response, and answers with the `traceparent` it
    /// would send on to a worker.
    fn forwards() -> Answer {
        // As a handler does: the work goes on in a task of its own.
        let task = tokio::spawn(in_current(async {
            let mut metadata = MetadataMap::new();
            inject_current(&mut metadata);
            let mut response = http::Response::new(());
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from_static("13"));
            if let Some(sent) = metadata.get(TRACEPARENT) {
                let sent = HeaderValue::from_bytes(sent.as_bytes()).expect("header");
                response.headers_mut().insert("sent", sent);
            }
            response
        }));
        Box::pin(async move { Ok(task.await.expect("the task ran")) })
    }

    #[test]
    fn a_calls_span_is_a_server_span_under_its_caller_and_is_sent_on() {
        let kept = Kept::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        set_rpc_tracer(opentelemetry::trace::TracerProvider::tracer(
            &provider, "test",
        ));
        let (mut service, request) = traced(forwards, "/heist.v1.ToolService/CallTool");
        // Not `futures::executor`: the SDK's simple processor runs its own executor per span.
        let response = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async { service.call(request).await })
            .expect("response");

        let spans = kept
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert_eq!(spans.len(), 1, "one span per call: {spans:?}");
        let span = &spans[0];
        assert_eq!(span.name, "/heist.v1.ToolService/CallTool");
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(
            span.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(
            span.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "rpc.grpc.status_code"
                    && kv.value == opentelemetry::Value::I64(13)),
            "{:?}",
            span.attributes
        );
        assert!(
            matches!(span.status, Status::Error { .. }),
            "{:?}",
            span.status
        );
        // What the call sends on names this span as the parent.
        let sent = response
            .headers()
            .get("sent")
            .and_then(|v| v.to_str().ok())
            .expect("a traceparent is sent on");
        assert_eq!(
            sent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                span.span_context.span_id()
            )
        );
        assert_eq!(
            response
                .headers()
                .get(TRACE_ID_HEADER)
                .map(HeaderValue::as_bytes),
            Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..])
        );
    }

    #[test]
    fn a_traceparent_is_parsed() {
        let cx = from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            context_trace_id(&cx).map(|t| t.to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(context_trace_id(&from_traceparent("garbage")).is_none());
        let fresh = process_traceparent();
        assert_eq!(
            traceparent_trace_id(&fresh).map(|t| t.len()),
            Some(32),
            "{fresh}"
        );
    }
}
