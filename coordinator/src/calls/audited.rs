//! The `tool.executed` audit record of a routed call: who called which tool in which session,
//! the BLAKE3 digest of the arguments' canonical encoding (never the arguments), the outcome
//! and how long it took. Agent tool calls, which run on the worker inside a turn, get the same
//! record from the turn's events ([`crate::turns`]).
//!
//! Durability: a mutating call's record is in the audit chain and flushed before the call's
//! answer is sent: by the flush that makes the call's request-id record durable, or by one of
//! its own when nothing else flushes (no request id, or an outcome the request-id record
//! leaves open). A read-only call's record is queued before the answer (in the chain once the
//! writer takes it; the writer is waited for only when its queue is long) and becomes durable
//! with the store's next group flush. Audit listings settle the queue first, so they hold
//! every record of an answered call. Which calls are recorded is HEIST_AUDIT_CALLS.

use std::{sync::Arc, time::Duration};

use heist_proto::{json::map_to_struct, v1::CallToolResponse};
use prost::Message as _;
use tonic::Code;
use tracing::warn;

use super::ToolCall;
use crate::{app::App, error::Error};

/// The audit kind of an executed tool call.
pub const EXECUTED: &str = "tool.executed";

/// `blake3:<hex>` of the canonical encoding of `arguments` (a protobuf `Struct`, whose keys
/// are sorted), as tool call records name arguments.
pub fn args_digest(arguments: &prost_types::Struct) -> String {
    format!(
        "blake3:{}",
        blake3::hash(&arguments.encode_to_vec()).to_hex()
    )
}

/// The detail of a `tool.executed` record.
pub fn detail(
    session: &str,
    tool: &str,
    args: &str,
    outcome: &str,
    took: Duration,
    via: &str,
) -> String {
    format!(
        "session={session} tool={tool} args={args} outcome={outcome} duration_ms={:.3} via={via}",
        took.as_secs_f64() * 1000.0
    )
}

/// A routed call being timed for its record.
pub(super) struct Execution {
    app: Arc<App>,
    principal: String,
    session: String,
    tool: String,
    /// `None` when HEIST_AUDIT_CALLS leaves this call out.
    args: Option<String>,
    read_only: bool,
    via: &'static str,
    started: std::time::Instant,
}

impl Execution {
    /// Starts the clock for `call` (`via`: `call` for unary, `stream` for streamed).
    pub(super) fn start(
        app: &Arc<App>,
        call: &ToolCall,
        read_only: bool,
        via: &'static str,
    ) -> Self {
        let args = app
            .config
            .audit_calls
            .records(read_only)
            .then(|| args_digest(&map_to_struct(&call.arguments)));
        Self {
            app: Arc::clone(app),
            principal: call.principal.id.clone(),
            session: call.session.to_string(),
            tool: call.tool.clone(),
            args,
            read_only,
            via,
            started: std::time::Instant::now(),
        }
    }

    /// Appends the record of `result`. `recorded` says the call's request-id record is
    /// written next (its flush covers this record unless the outcome is unknown); otherwise a
    /// mutating call's record is flushed here. A failure is logged: the tool already ran, and
    /// a failed write or flush stops the store taking mutations until a test write works.
    pub(super) async fn finish(self, result: Result<&CallToolResponse, &Error>, recorded: bool) {
        let Some(detail) = self.detail(outcome(result)) else {
            return;
        };
        if self.read_only {
            // Not flushed before the answer either way: answering once it is queued loses
            // nothing, and the queue keeps the order.
            self.app
                .audit
                .append_queued(EXECUTED, &self.principal, detail)
                .await;
            return;
        }
        if self
            .app
            .audit
            .append(EXECUTED, &self.principal, detail)
            .await
            .is_none()
        {
            return;
        }
        let unknown = result.err().is_some_and(Error::outcome_unknown);
        if !self.read_only
            && (!recorded || unknown)
            && let Err(err) = self.app.store.flush().await
        {
            warn!(%err, session_id = %self.session, "cannot flush the call's audit record");
        }
    }

    /// Records a call whose caller went away before its result (the worker's command is
    /// cancelled with the stream).
    pub(super) fn cancelled(self) {
        if let Some(detail) = self.detail("cancelled".to_owned()) {
            self.app.audit.record(EXECUTED, &self.principal, &detail);
        }
    }

    fn detail(&self, outcome: String) -> Option<String> {
        let args = self.args.as_deref()?;
        Some(detail(
            &self.session,
            &self.tool,
            args,
            &outcome,
            self.started.elapsed(),
            self.via,
        ))
    }
}

/// `ok`, `tool_error` (the tool answered with `is_error`), or the failure's gRPC code in
/// snake case (`unavailable`, `deadline_exceeded`, ...).
pub fn outcome(result: Result<&CallToolResponse, &Error>) -> String {
    match result {
        Ok(resp) if resp.is_error => "tool_error".to_owned(),
        Ok(_) => "ok".to_owned(),
        Err(err) => code_name(error_code(err)),
    }
}

/// The code a routed call's failure reaches the client with (the failures a forwarded call
/// can have; anything else is `unknown`).
fn error_code(err: &Error) -> Code {
    match err {
        Error::Status(status) => status.code(),
        Error::WorkerUnavailable(_) | Error::SessionRecovering(_) | Error::Store(_) => {
            Code::Unavailable
        }
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::RequestIdReused(_) => Code::InvalidArgument,
        Error::Task(_) => Code::Internal,
        _ => Code::Unknown,
    }
}

/// `DeadlineExceeded` -> `deadline_exceeded`.
fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_digest_is_of_the_canonical_arguments_and_the_detail_holds_no_argument() {
        let (a, b) = (
            json!({"path": "secret.txt", "content": "hunter2", "n": {"b": 1, "a": 2}}),
            json!({"n": {"a": 2, "b": 1}, "content": "hunter2", "path": "secret.txt"}),
        );
        let digest = |v: serde_json::Value| {
            let serde_json::Value::Object(map) = v else {
                panic!("object")
            };
            args_digest(&map_to_struct(&map))
        };
        let (da, db) = (digest(a), digest(b));
        assert_eq!(da, db, "key order does not change the digest");
        assert_ne!(da, digest(json!({"path": "secret.txt", "content": "x"})));
        assert!(da.starts_with("blake3:") && da.len() == 7 + 64, "{da}");
        let d = detail(
            "s-1",
            "fs.write",
            &da,
            "ok",
            Duration::from_micros(1500),
            "call",
        );
        assert!(!d.contains("hunter2") && !d.contains("secret.txt"), "{d}");
        assert!(d.contains("duration_ms=1.500"), "{d}");
    }

    #[test]
    fn outcomes_name_the_tool_error_or_the_code() {
        let failed = CallToolResponse {
            is_error: true,
            ..Default::default()
        };
        assert_eq!(outcome(Ok(&CallToolResponse::default())), "ok");
        assert_eq!(outcome(Ok(&failed)), "tool_error");
        let err = Error::Status(tonic::Status::deadline_exceeded("late"));
        assert_eq!(outcome(Err(&err)), "deadline_exceeded");
        let err = Error::Status(tonic::Status::invalid_argument("bad"));
        assert_eq!(outcome(Err(&err)), "invalid_argument");
    }
}
