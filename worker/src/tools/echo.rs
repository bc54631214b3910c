//! `echo`: returns its arguments unchanged. The cheapest possible tool, used by benchmarks to
//! measure the routing path; it touches no filesystem. An optional `delay_ms` (at most
//! [`MAX_DELAY_MS`]) makes it answer late, for exercising deadlines, cancellation and drains; the
//! wait ends early when the call is cancelled.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value as Json, json};

use super::{Tool, ToolContext, ToolOutput};
use crate::Error;

/// Longest `delay_ms` echo accepts (one minute).
pub(crate) const MAX_DELAY_MS: u64 = 60_000;

/// The echo tool.
pub(crate) struct Echo;

impl Tool for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn description(&self) -> &'static str {
        "Returns its arguments object unchanged (as a JSON block and as structured content)."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "description": "Any object; it is returned as is.",
            "properties": {
                "delay_ms": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_DELAY_MS,
                    "description": "Wait this long before answering (for testing deadlines)."
                }
            }
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            if let Some(ms) = args
                .get("delay_ms")
                .and_then(Json::as_u64)
                .filter(|ms| *ms > 0)
            {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))) => {}
                    () = ctx.cancel.cancelled() => return Err(Error::Stopped),
                }
            }
            match args {
                Json::Object(map) => Ok(ToolOutput::object(map)),
                other => Err(Error::SchemaViolation {
                    field: String::new(),
                    message: format!("arguments: {other} is not an object"),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Content, test_support::*};
    use serde_json::json;

    #[tokio::test]
    async fn echoes_arguments() {
        let (_tmp, ctx) = context();
        let args = json!({"a": [1, "x", null], "b": {"c": true}});
        let out = run(&ctx, "echo", args.clone()).await.expect("echo");
        assert!(!out.is_error);
        assert_eq!(out.content, vec![Content::Json(args.clone())]);
        assert_eq!(out.structured.map(serde_json::Value::Object), Some(args));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_delay_ms_and_stops_when_cancelled() {
        let (_tmp, ctx) = context();
        let started = tokio::time::Instant::now();
        run(&ctx, "echo", json!({"delay_ms": 250}))
            .await
            .expect("echo");
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));

        ctx.cancel.cancel();
        let err = run(&ctx, "echo", json!({"delay_ms": 60_000}))
            .await
            .expect_err("cancelled");
        assert!(matches!(err, crate::Error::Stopped), "{err:?}");
    }

    #[tokio::test]
    async fn refuses_delays_over_the_limit() {
        let (_tmp, ctx) = context();
        let err = run(&ctx, "echo", json!({"delay_ms": 60_001}))
            .await
            .expect_err("too long");
        assert!(
            matches!(err, crate::Error::SchemaViolation { .. }),
            "{err:?}"
        );
    }
}
