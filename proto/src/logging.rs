//! Logging and trace export shared by every binary: LOG_LEVEL (an EnvFilter directive such as
//! `info` or `heist_coordinator=debug,info`) and LOG_FORMAT (`text`, the default, or `json`).
//! Logs go to stderr so stdout stays free for data.
//!
//! Traces: when an OTLP endpoint is configured ([`Otlp::from_env`]: OTEL_EXPORTER_OTLP_ENDPOINT
//! or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), the spans of heist's own crates are exported over
//! OTLP/gRPC by a batch processor, through the `tracing` OpenTelemetry layer. The exporter
//! honours the standard variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
//! OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_EXPORTER_OTLP_COMPRESSION,
//! OTEL_TRACES_SAMPLER); without OTEL_TRACES_SAMPLER the sampler is [`crate::sampling`]'s.
//! Without an endpoint no OpenTelemetry layer is installed at all. [`Telemetry::shutdown`]
//! flushes what is still queued; binaries call it after a graceful shutdown.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, Targets},
    fmt,
    layer::{Filter, SubscriberExt as _},
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

/// How long [`Telemetry::shutdown`] waits for queued spans to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and as whom traces are exported.
#[derive(Clone, Debug)]
pub struct Otlp {
    /// The OTLP/gRPC collector, e.g. `http://jaeger:4317`.
    pub endpoint: String,
    /// `service.name` when OTEL_SERVICE_NAME does not set one (`heist-coordinator`, ...).
    pub service_name: String,
    /// New traces per second of the default sampler ([`crate::sampling`]); `None` when
    /// OTEL_TRACES_SAMPLER sets a standard one.
    pub traces_per_second: Option<f64>,
}

impl Otlp {
    /// The export settings from the standard environment: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    /// else OTEL_EXPORTER_OTLP_ENDPOINT; `None` (no export) when neither is set or both are
    /// empty. OTEL_EXPORTER_OTLP_PROTOCOL, if set, must be `grpc`: the only transport built in.
    pub fn from_env(service_name: &str) -> Result<Option<Self>, String> {
        let endpoint = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|v| !v.trim().is_empty());
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Ok(protocol) = std::env::var(name)
                && !protocol.is_empty()
                && protocol != "grpc"
            {
                return Err(format!(
                    "{name}={protocol:?} is not supported: heist exports traces over OTLP/gRPC \
                     (set it to grpc, and the endpoint to the collector's gRPC port, usually 4317)"
                ));
            }
        }
        Ok(Some(Self {
            endpoint: endpoint.trim().to_owned(),
            service_name: service_name.to_owned(),
            traces_per_second: crate::sampling::traces_per_second_from_env()?,
        }))
    }
}

/// The installed trace pipeline; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() after serving so queued spans are sent"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued (waiting at most a few seconds) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            eprintln!("warning: cannot flush traces to the OTLP endpoint: {err}");
        }
    }
}

/// Installs the global subscriber without trace export (the CLI, tools). A malformed
/// LOG_LEVEL is an error naming the bad directive.
pub fn init(level: &str, format: &str) -> Result<(), String> {
    init_with(level, format, None).map(|_| ())
}

/// Installs the global subscriber, exporting traces to `otlp` when given. Must run inside a
/// Tokio runtime when `otlp` is given (the gRPC exporter's channel lives there).
pub fn init_with(level: &str, format: &str, otlp: Option<Otlp>) -> Result<Telemetry, String> {
    let filter = log_filter(level)?;
    crate::trace::set_logs_show_rpc_spans(logs_show_rpc_spans(level));
    let fmt_layer = match format {
        "json" => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        "text" | "" => fmt::layer().with_writer(std::io::stderr).boxed(),
        other => {
            return Err(format!(
                "LOG_FORMAT {other:?} is not known: use text or json"
            ));
        }
    };
    let (otel, provider) = match otlp {
        Some(otlp) => {
            let (layer, provider) = otel_layer(&otlp)?;
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}

/// Whether log lines under LOG_LEVEL `level` show the fields of the calls' spans (INFO spans of
/// `heist_proto::trace`). Only a static filter is asked; a dynamic one may show them.
fn logs_show_rpc_spans(level: &str) -> bool {
    static_targets(level).is_none_or(|targets| {
        targets.would_enable(crate::trace::RPC_SPAN_TARGET, &tracing::Level::INFO)
    })
}

/// LOG_LEVEL as a static filter, when it only names targets and levels: no span or field
/// directive (`[span]`, `{field}`), which `Targets` would take for part of a target's name.
fn static_targets(level: &str) -> Option<Targets> {
    if level.contains(['[', ']', '{', '}']) {
        return None;
    }
    level.parse().ok()
}

/// The filter of the log lines for LOG_LEVEL. Directives that only name targets and levels (the
/// usual `info` or `heist_worker=debug,warn`) make a static filter, decided once per callsite;
/// only directives on spans or fields (`[call-tool]=debug`) need the dynamic one, which looks
/// up every span on every enter and exit.
fn log_filter<S>(level: &str) -> Result<Box<dyn Filter<S> + Send + Sync>, String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if let Some(targets) = static_targets(level) {
        return Ok(FilterExt::boxed(targets));
    }
    EnvFilter::try_new(level)
        .map(FilterExt::boxed)
        .map_err(|e| format!("LOG_LEVEL {level:?} is not a valid filter: {e}"))
}

/// The OpenTelemetry layer for `otlp` and its provider. Only heist's own spans (targets
/// `heist*`) are exported: the exporter's own transport (tonic, hyper, h2) would otherwise
/// trace itself.
pub fn otel_layer<S>(
    otlp: &Otlp,
) -> Result<(Box<dyn Layer<S> + Send + Sync>, SdkTracerProvider), String>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .map_err(|e| {
            format!(
                "cannot set up the OTLP exporter for {:?}: {e}",
                otlp.endpoint
            )
        })?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(otlp.service_name.clone());
    }
    let mut provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter);
    if let Some(rate) = otlp.traces_per_second {
        provider = provider.with_sampler(crate::sampling::default_sampler(rate));
    }
    let provider = provider.build();
    let tracer = provider.tracer("heist");
    // Each call's span is made with the SDK by the RPC layer (see `crate::trace`).
    crate::trace::set_rpc_tracer(tracer.clone());
    // Per-span work kept to what a trace needs: no busy/idle timers, no OpenTelemetry context
    // switch on every poll of an instrumented future (a span finds its parent through the
    // registry, or, under none, in the call's context the RPC layer attached), and no thread,
    // source location or target attributes on every span.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        // A static filter: decided once per callsite, not on every span. The calls' log spans
        // are not exported: each call's span is made with the SDK (see `crate::trace`).
        .with_filter(
            Targets::new()
                .with_target("heist", LevelFilter::INFO)
                .with_target(crate::trace::RPC_SPAN_TARGET, LevelFilter::OFF),
        )
        .boxed();
    Ok((layer, provider))
}

/// Installs the OpenTelemetry layer and a test-friendly log layer for tests that receive
/// spans; returns the provider to flush. Fails if a subscriber is already installed.
pub fn init_for_tests(otlp: &Otlp) -> Result<SdkTracerProvider, String> {
    let (layer, provider) = otel_layer(otlp)?;
    tracing_subscriber::registry()
        .with(layer)
        .with(
            fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::new("warn")),
        )
        .try_init()
        .map_err(|e| format!("cannot install the subscriber: {e}"))?;
    Ok(provider)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use tracing::{Level, event};
    use tracing_subscriber::Registry;

    use super::*;

    /// Counts the events it is given.
    struct Count(Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn log_levels_filter_by_target_and_level() {
        let seen = Arc::new(AtomicUsize::new(0));
        let filter = log_filter::<Registry>("heist_worker=debug,warn").expect("valid");
        let subscriber = Registry::default().with(Count(seen.clone()).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            event!(target: "heist_worker::sandbox", Level::DEBUG, "kept");
            event!(target: "heist_worker::sandbox", Level::TRACE, "dropped");
            event!(target: "h2::codec", Level::INFO, "dropped");
            event!(target: "h2::codec", Level::WARN, "kept");
        });
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert!(logs_show_rpc_spans("info"));
        assert!(logs_show_rpc_spans("heist_proto=info,warn"));
        assert!(!logs_show_rpc_spans("warn"));
        assert!(
            logs_show_rpc_spans("[rpc]=info,warn"),
            "a dynamic filter may show them"
        );
        // Span directives are still understood (by the dynamic filter, not taken for a target).
        assert!(static_targets("[call-tool]=debug,info").is_none());
        assert!(log_filter::<Registry>("[call-tool]=debug,info").is_ok());
        let err = log_filter::<Registry>("heist=loud").err().expect("invalid");
        assert!(err.contains("LOG_LEVEL \"heist=loud\""), "{err}");
    }
}
