//! The default trace sampler (when OTEL_TRACES_SAMPLER is not set): a call whose caller sent a
//! `traceparent` is traced as the caller decided (its sampled flag), and the traces this process
//! starts itself (calls that arrive without a trace context, background work) are capped at a
//! rate, HEIST_TRACES_PER_SECOND. At the usual call rates of an operator or a test every call is
//! traced; under heavy load the export's cost stays bounded (a span costs several microseconds
//! to make and send, a large share of a routed call: see docs/BENCHMARKS.md, "Observability
//! cost"). Any standard OTEL_TRACES_SAMPLER replaces it (`parentbased_always_on` traces every
//! call).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use opentelemetry::{
    Context, KeyValue,
    trace::{Link, SpanKind, TraceContextExt as _, TraceId},
};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};

/// New traces a process starts per second by default.
pub const DEFAULT_TRACES_PER_SECOND: f64 = 100.0;

/// The default sampler: parent-based, with new traces capped at `traces_per_second` (0: only
/// the traces callers start).
pub fn default_sampler(traces_per_second: f64) -> Sampler {
    Sampler::ParentBased(Box::new(RootRate::new(traces_per_second)))
}

/// Reads HEIST_TRACES_PER_SECOND: `None` when a standard OTEL_TRACES_SAMPLER is set (it
/// decides), else the rate of the default sampler. A rate that is not a finite number ≥ 0, or
/// one set beside OTEL_TRACES_SAMPLER, is an error saying what to change.
pub fn traces_per_second_from_env() -> Result<Option<f64>, String> {
    let standard = std::env::var("OTEL_TRACES_SAMPLER")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let ours = std::env::var("HEIST_TRACES_PER_SECOND")
        .ok()
        .filter(|v| !v.trim().is_empty());
    match (standard, ours) {
        (Some(standard), Some(_)) => Err(format!(
            "HEIST_TRACES_PER_SECOND caps heist's default sampler, but OTEL_TRACES_SAMPLER \
             ({standard:?}) replaces that sampler: unset one of them"
        )),
        (Some(_), None) => Ok(None),
        (None, None) => Ok(Some(DEFAULT_TRACES_PER_SECOND)),
        (None, Some(value)) => parse_rate(&value).map(Some),
    }
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "HEIST_TRACES_PER_SECOND={value:?} is not a rate: give the new traces per second \
             a process may start, a number ≥ 0 (default {DEFAULT_TRACES_PER_SECOND})"
        )),
    }
}

/// Samples root spans at up to a rate: a token bucket refilled at `rate` per second, holding
/// at most one second's worth (at least one token when the rate is above 0), full at start.
#[derive(Clone, Debug)]
pub struct RootRate {
    bucket: Arc<Mutex<Bucket>>,
}

impl RootRate {
    /// A sampler starting up to `rate` traces per second.
    pub fn new(rate: f64) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(Bucket::new(rate))),
        }
    }

    fn take(&self, now: Instant) -> bool {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(now)
    }
}

impl ShouldSample for RootRate {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        let decision = if self.take(Instant::now()) {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        };
        SamplingResult {
            decision,
            attributes: Vec::new(),
            trace_state: parent_context
                .map(|cx| cx.span().span_context().trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        let capacity = if rate > 0.0 { rate.max(1.0) } else { 0.0 };
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.capacity);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn taken(bucket: &mut Bucket, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| bucket.take(now)).count()
    }

    #[test]
    fn a_burst_gets_one_seconds_worth_then_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10.0);
        assert_eq!(
            taken(&mut bucket, start, 100),
            10,
            "the first second's burst"
        );
        assert_eq!(
            taken(&mut bucket, start, 100),
            0,
            "nothing left at the same instant"
        );
        let later = start + Duration::from_millis(500);
        assert_eq!(
            taken(&mut bucket, later, 100),
            5,
            "half a second refills half"
        );
        let idle = later + Duration::from_secs(60);
        assert_eq!(
            taken(&mut bucket, idle, 100),
            10,
            "an idle minute refills one second"
        );
    }

    #[test]
    fn a_slow_rate_still_starts_a_trace_and_zero_starts_none() {
        let start = Instant::now();
        let mut slow = Bucket::new(0.5);
        assert_eq!(taken(&mut slow, start, 10), 1);
        assert_eq!(taken(&mut slow, start + Duration::from_secs(1), 10), 0);
        assert_eq!(taken(&mut slow, start + Duration::from_secs(2), 10), 1);
        let mut none = Bucket::new(0.0);
        assert_eq!(taken(&mut none, start + Duration::from_secs(100), 10), 0);
    }

    #[test]
    fn a_callers_decision_is_followed_whatever_the_rate() {
        use opentelemetry::trace::{
            Span as _, SpanContext, SpanId, TraceFlags, TraceState, Tracer as _,
            TracerProvider as _,
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(default_sampler(0.0))
            .build();
        let tracer = provider.tracer("test");
        let remote = |flags| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(7),
                SpanId::from(9),
                flags,
                true,
                TraceState::default(),
            ))
        };
        let sampled = tracer.start_with_context("call", &remote(TraceFlags::SAMPLED));
        assert!(sampled.span_context().is_sampled());
        let unsampled = tracer.start_with_context("call", &remote(TraceFlags::default()));
        assert!(!unsampled.span_context().is_sampled());
        let root = tracer.start_with_context("call", &Context::new());
        assert!(!root.span_context().is_sampled(), "rate 0 starts no trace");
    }

    #[test]
    fn rates_are_checked() {
        assert_eq!(parse_rate(" 2.5 "), Ok(2.5));
        assert_eq!(parse_rate("0"), Ok(0.0));
        for bad in ["-1", "NaN", "inf", "many"] {
            let err = parse_rate(bad).expect_err(bad);
            assert!(err.contains("HEIST_TRACES_PER_SECOND"), "{err}");
        }
    }
}
