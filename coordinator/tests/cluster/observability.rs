//! Traces and metrics: a real OTLP receiver (the official TraceService, from the OTLP protobuf
//! definitions) gets the spans of a routed call, and `/metrics` of both binaries passes
//! Prometheus's own parser (`promtool check metrics`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use heist_proto::{logging::Otlp, v1};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::json;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

use crate::harness::*;

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a free loopback port; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    fn spans_of(&self, trace_id: &[u8]) -> Vec<Span> {
        self.spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain of span names from `span` up to the root of the spans given.
fn ancestry(spans: &[Span], span: &Span) -> Vec<String> {
    let mut names = vec![span.name.clone()];
    let mut parent = span.parent_span_id.clone();
    while let Some(p) = spans
        .iter()
        .find(|s| !parent.is_empty() && s.span_id == parent)
    {
        names.push(p.name.clone());
        parent = p.parent_span_id.clone();
    }
    names
}

/// The spans of `trace_id`, once one of each of `names` has arrived.
async fn spans_named(receiver: &Receiver, trace_id: &[u8], names: &[&str]) -> Vec<Span> {
    wait_for(&format!("the spans {names:?}"), || {
        let spans = receiver.spans_of(trace_id);
        let complete = names.iter().all(|n| spans.iter().any(|s| s.name == *n));
        async move { complete.then_some(spans) }
    })
    .await
}

/// The span named `name`.
fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
}

/// A `tool` call with `args` (and `request_id`), without a trace context.
fn call_request(
    token: &str,
    session_id: &str,
    tool: &str,
    args: serde_json::Value,
    request_id: &str,
) -> tonic::Request<v1::CallToolRequest> {
    let arguments = heist_proto::json::json_to_struct(&args).expect("args");
    authed(
        token,
        v1::CallToolRequest {
            session_id: session_id.to_owned(),
            tool: tool.to_owned(),
            arguments: Some(arguments),
            request_id: request_id.to_owned(),
        },
    )
}

/// [`call_request`] in the trace of `traceparent`.
fn traced_call(
    token: &str,
    session_id: &str,
    tool: &str,
    args: serde_json::Value,
    request_id: &str,
    traceparent: &str,
) -> tonic::Request<v1::CallToolRequest> {
    let mut request = call_request(token, session_id, tool, args, request_id);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    request
}

/// A receiver, and the process's trace pipeline exporting to it. The subscriber is
/// process-wide: nextest runs each test in a process of its own, and every server the test
/// starts exports through it (the endpoint is passed, not set in the env).
async fn export_to_receiver() -> (Receiver, SdkTracerProvider) {
    export_sampled(None).await
}

/// [`export_to_receiver`] with heist's default sampler capped at `traces_per_second` (`None`:
/// the SDK's, which samples every trace here, OTEL_TRACES_SAMPLER being unset).
async fn export_sampled(traces_per_second: Option<f64>) -> (Receiver, SdkTracerProvider) {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let provider = heist_proto::logging::init_for_tests(&Otlp {
        endpoint,
        service_name: "heist-test".to_owned(),
        traces_per_second,
    })
    .expect("install the trace pipeline (run this test alone: cargo nextest)");
    (receiver, provider)
}

/// Sends what is queued now; spans that end later go with the next periodic export.
async fn flush(provider: SdkTracerProvider) -> SdkTracerProvider {
    tokio::task::spawn_blocking(move || {
        let _ = provider.force_flush();
        provider
    })
    .await
    .expect("flush")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_call_is_one_trace_from_the_client_through_the_worker() {
    let (receiver, provider) = export_to_receiver().await;

    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session");

    // The client's own trace context: trace id T, its span S.
    let trace_id = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    let client_span = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&client_span));
    let request = traced_call(
        &client.token,
        &session.id,
        "echo",
        json!({"msg": "traced"}),
        "",
        &traceparent,
    );
    let response = client.tools.call_tool(request).await.expect("echo");
    assert_eq!(
        response
            .metadata()
            .get(heist_proto::trace::TRACE_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(hex(&trace_id).as_str()),
        "the response names the trace"
    );

    let provider = flush(provider).await;
    let spans = spans_named(
        &receiver,
        &trace_id,
        &[
            "/heist.v1.ToolService/CallTool",
            "/heist.v1.WorkerService/CallTool",
        ],
    )
    .await;

    // The coordinator's RPC span is the child of the client's span.
    let coord_rpc = named(&spans, "/heist.v1.ToolService/CallTool");
    assert_eq!(
        coord_rpc.parent_span_id, client_span,
        "parented by the client"
    );
    // The worker's span hangs under the coordinator's, through the injected traceparent. A
    // gRPC CallTool is one span per hop: each RPC's span is its tool call's span.
    let worker_tool = named(&spans, "/heist.v1.WorkerService/CallTool");
    assert_eq!(
        ancestry(&spans, worker_tool),
        [
            "/heist.v1.WorkerService/CallTool",
            "/heist.v1.ToolService/CallTool",
        ],
        "worker rpc → coordinator rpc"
    );
    assert!(
        spans.iter().all(|s| s.trace_id == coord_rpc.trace_id),
        "one trace"
    );
    // Ids are attributes; arguments are not.
    let attrs: BTreeMap<String, String> = worker_tool
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
        .collect();
    assert!(attrs.contains_key("session_id"), "{attrs:?}");
    assert!(
        attrs.get("tool").is_some_and(|v| v.contains("echo")),
        "{attrs:?}"
    );
    assert!(
        attrs
            .get("rpc.grpc.status_code")
            .is_some_and(|v| v.contains("IntValue(0)")),
        "the gRPC status as a number: {attrs:?}"
    );
    let coord_attrs: Vec<&str> = coord_rpc
        .attributes
        .iter()
        .map(|kv| kv.key.as_str())
        .collect();
    assert!(
        coord_attrs.contains(&"tool") && coord_attrs.contains(&"session_id"),
        "{coord_attrs:?}"
    );
    assert!(
        !attrs.values().any(|v| v.contains("traced")),
        "arguments stay out of spans: {attrs:?}"
    );

    // A sandboxed command, in a call with a request id (which the coordinator and the worker
    // each finish in a task of their own), hangs under both hops too.
    let trace_id = [0x5a; 16];
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&client_span));
    let request = traced_call(
        &client.token,
        &session.id,
        "exec",
        json!({"command": "echo traced"}),
        "traced-exec-1",
        &traceparent,
    );
    let response = client.tools.call_tool(request).await.expect("exec");
    assert!(!response.get_ref().is_error, "{:?}", response.get_ref());
    let _provider = flush(provider).await;
    let spans = spans_named(
        &receiver,
        &trace_id,
        &["sandbox_command", "/heist.v1.ToolService/CallTool"],
    )
    .await;
    let command = named(&spans, "sandbox_command");
    assert_eq!(
        ancestry(&spans, command),
        [
            "sandbox_command",
            "/heist.v1.WorkerService/CallTool",
            "/heist.v1.ToolService/CallTool",
        ],
        "command → worker rpc → coordinator rpc"
    );

    worker.stop().await;
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_call_with_a_traceparent_in_its_meta_joins_that_trace() {
    let (receiver, provider) = export_to_receiver().await;
    let cluster = crate::mcp::Cluster::start().await;
    let trace_id = [0x5a; 16];
    let client_span = [0x0c; 8];
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&client_span));
    // The official MCP SDK sends `_meta.traceparent` on tools/call.
    let report = cluster
        .run("traced", &[("HEIST_TRACEPARENT", traceparent)])
        .await;
    assert_eq!(
        report["trace_id"],
        hex(&trace_id),
        "the result's _meta names the client's trace"
    );

    let _provider = flush(provider).await;
    let spans = spans_named(
        &receiver,
        &trace_id,
        &["mcp-call", "/heist.v1.WorkerService/CallTool"],
    )
    .await;
    let call = named(&spans, "mcp-call");
    assert_eq!(call.parent_span_id, client_span, "parented by the client");
    assert_eq!(call.trace_state, "heist=test", "tracestate carried");
    let worker_tool = named(&spans, "/heist.v1.WorkerService/CallTool");
    assert_eq!(
        ancestry(&spans, worker_tool)[1..],
        ["tool_call", "mcp-call"],
        "an MCP call has a tool_call span of its own under the MCP request's"
    );
    assert_eq!(
        ancestry(&spans, worker_tool).last().map(String::as_str),
        Some("mcp-call"),
        "the worker's spans hang under the MCP call: {:?}",
        ancestry(&spans, worker_tool)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sampler_caps_new_traces_and_keeps_every_callers_trace_whole() {
    const RATE: f64 = 4.0;
    let (receiver, provider) = export_sampled(Some(RATE)).await;
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let session = client.create_session(&[]).await.expect("session");
    // The setup's own calls started traces too; a second refills the bucket (RATE at most).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // Calls without a trace context: this process starts their traces, RATE per second.
    const CALLS: usize = 200;
    let started = std::time::Instant::now();
    let mut named_traces = Vec::new();
    for _ in 0..CALLS {
        let request = call_request(&client.token, &session.id, "echo", json!({"msg": "x"}), "");
        let response = client.tools.call_tool(request).await.expect("echo");
        if let Some(id) = response
            .metadata()
            .get(heist_proto::trace::TRACE_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            named_traces.push(id.to_owned());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cap = (RATE + (elapsed * RATE).ceil()) as usize;
    assert!(
        !named_traces.is_empty() && named_traces.len() <= cap,
        "{} of {CALLS} calls in {elapsed:.2} s traced, at most {cap} expected",
        named_traces.len()
    );
    assert!(named_traces.len() < CALLS, "new traces are capped");

    // A caller's sampled trace is followed whatever the rate.
    let trace_id = [0x6b; 16];
    let client_span = [0x0d; 8];
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&client_span));
    let request = traced_call(
        &client.token,
        &session.id,
        "echo",
        json!({"msg": "traced"}),
        "",
        &traceparent,
    );
    client.tools.call_tool(request).await.expect("echo");

    let _provider = flush(provider).await;
    const HOPS: [&str; 2] = [
        "/heist.v1.ToolService/CallTool",
        "/heist.v1.WorkerService/CallTool",
    ];
    spans_named(&receiver, &trace_id, &HOPS).await;
    // Every trace a response named arrives whole (both hops), and no other call was exported.
    for id in &named_traces {
        let bytes: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        spans_named(&receiver, &bytes, &HOPS).await;
    }
    let exported_calls: std::collections::BTreeSet<String> = receiver
        .spans
        .lock()
        .expect("spans")
        .iter()
        .filter(|s| s.name == HOPS[0])
        .map(|s| hex(&s.trace_id))
        .collect();
    let mut expected: std::collections::BTreeSet<String> = named_traces.into_iter().collect();
    expected.insert(hex(&trace_id));
    assert_eq!(
        exported_calls, expected,
        "exactly the sampled calls are exported"
    );

    worker.stop().await;
    coord.stop().await;
}

#[test]
fn a_bad_trace_rate_stops_the_coordinator_with_what_to_change() {
    let dir = crate::harness::tempdir();
    for (env, says) in [
        (vec![("HEIST_TRACES_PER_SECOND", "lots")], "a number ≥ 0"),
        (
            vec![
                ("HEIST_TRACES_PER_SECOND", "5"),
                ("OTEL_TRACES_SAMPLER", "always_on"),
            ],
            "unset one of them",
        ),
    ] {
        let log = dir.path().join("coordinator.log");
        let mut env = env;
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"));
        let mut child =
            spawn_coordinator_process_with(free_port(), &dir.path().join("data"), &log, &env);
        // A coordinator that took the setting serves until killed (the guard does).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("wait") {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "{env:?} was accepted");
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let stderr = std::fs::read_to_string(&log).expect("log");
        assert!(!status.success(), "{env:?} was accepted");
        assert!(
            stderr.contains("HEIST_TRACES_PER_SECOND") && stderr.contains(says),
            "{env:?}: {stderr}"
        );
    }
}

/// `GET path` with an optional bearer token: status and body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    http(addr, "GET", path, &auth, "").await
}

/// The value of the sample `name{labels}` (labels exactly as rendered), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `promtool check metrics` on `text`; fails the test with promtool's own words.
fn promtool_check(what: &str, text: &str) {
    use std::io::Write as _;
    let promtool = std::env::var("HEIST_PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!(
            "cannot run {promtool:?} ({e}): install Prometheus's promtool (Debian package \
             `prometheus`; .ci/run does) or point HEIST_PROMTOOL at it"
        )
    });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool rejects the {what} metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_need_a_token_pass_promtool_and_count_calls() {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let worker = Worker::start(&coord.url(), dir.path(), WorkerOpts::new("w1")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1"]).await;
    let token = client.token.clone();

    for addr in [coord.addr, worker.addr] {
        let (status, _) = get(addr, "/metrics", None).await;
        assert_eq!(status, 401, "/metrics of {addr} without a token");
        let (status, _) = get(addr, "/metrics", Some("not-a-token")).await;
        assert_eq!(status, 401, "/metrics of {addr} with a forged token");
    }

    let session = client.create_session(&[]).await.expect("session");
    let echo_ok = r#"heist_tool_calls_total{tool="echo",outcome="ok"}"#;
    let worker_echo_ok = r#"heist_worker_tool_calls_total{tool="echo",outcome="ok"}"#;
    let rpc_ok = r#"heist_rpc_requests_total{method="/heist.v1.ToolService/CallTool",code="OK"}"#;
    let (status, before) = get(coord.addr, "/metrics", Some(&token)).await;
    assert_eq!(status, 200, "{before}");
    let (_, worker_before) = get(worker.addr, "/metrics", Some(&token)).await;
    for _ in 0..3 {
        client
            .call(&session.id, "echo", json!({"n": 1}))
            .await
            .expect("echo");
    }
    let (_, after) = get(coord.addr, "/metrics", Some(&token)).await;
    let (status, worker_after) = get(worker.addr, "/metrics", Some(&token)).await;
    assert_eq!(status, 200, "{worker_after}");
    assert_eq!(
        sample(&after, echo_ok) - sample(&before, echo_ok),
        3.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, rpc_ok) - sample(&before, rpc_ok),
        3.0,
        "{after}"
    );
    assert_eq!(
        sample(&worker_after, worker_echo_ok) - sample(&worker_before, worker_echo_ok),
        3.0,
        "{worker_after}"
    );
    assert_eq!(
        sample(&after, r#"heist_sessions{state="ready"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"heist_workers{state="ready"}"#),
        1.0,
        "{after}"
    );
    assert!(
        sample(&after, r#"heist_auth_refusals_total{reason="401"}"#) >= 2.0,
        "{after}"
    );
    assert!(!after.contains(&session.id), "no session ids in labels");

    promtool_check("coordinator", &after);
    promtool_check("worker", &worker_after);

    worker.stop().await;
    coord.stop().await;
}
