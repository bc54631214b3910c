//! Rich errors: canonical codes, a message that says what to do, and `google.rpc.ErrorInfo`
//! (domain + reason + metadata) for programs that must branch on the cause.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// ErrorInfo domain of every heist error.
pub const DOMAIN: &str = "heist.dev";

/// ErrorInfo reasons. Stable: programs match on them.
pub mod reason {
    /// No worker is registered and connected.
    pub const NO_WORKERS: &str = "NO_WORKERS";
    /// Every eligible worker is at capacity.
    pub const ALL_WORKERS_FULL: &str = "ALL_WORKERS_FULL";
    /// No connected worker has the requested labels.
    pub const NO_MATCHING_WORKER: &str = "NO_MATCHING_WORKER";
    /// The session does not exist (or belongs to someone else).
    pub const SESSION_NOT_FOUND: &str = "SESSION_NOT_FOUND";
    /// The session exists but is not ready (closing, closed, failed).
    pub const SESSION_NOT_READY: &str = "SESSION_NOT_READY";
    /// The session's worker is not connected right now.
    pub const WORKER_UNAVAILABLE: &str = "WORKER_UNAVAILABLE";
    /// The worker does not exist.
    pub const WORKER_NOT_FOUND: &str = "WORKER_NOT_FOUND";
    /// The tool does not exist on the session's worker.
    pub const TOOL_NOT_FOUND: &str = "TOOL_NOT_FOUND";
    /// Tool arguments violate the tool's input schema (metadata: `field`).
    pub const SCHEMA_VIOLATION: &str = "SCHEMA_VIOLATION";
    /// A path leaves the session workspace (metadata: `path`).
    pub const PATH_OUTSIDE_WORKSPACE: &str = "PATH_OUTSIDE_WORKSPACE";
    /// A request id was reused with different arguments.
    pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
    /// A call with this request id is still running.
    pub const REQUEST_IN_PROGRESS: &str = "REQUEST_IN_PROGRESS";
    /// A call with this request id was interrupted while it was being applied (its process
    /// died or it was stopped), so whether it took effect is not known: inspect the state and
    /// retry with a new request id (metadata: `request_id`).
    pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";
    /// A request field is malformed (metadata: `field`).
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    /// No bearer token was sent.
    pub const TOKEN_MISSING: &str = "TOKEN_MISSING";
    /// The bearer token is malformed, forged, or for another audience or issuer.
    pub const TOKEN_INVALID: &str = "TOKEN_INVALID";
    /// The bearer token has expired.
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    /// The token lacks the scope the RPC needs (metadata: `scope`).
    pub const SCOPE_MISSING: &str = "SCOPE_MISSING";
    /// Wrong client id or secret.
    pub const BAD_CLIENT_CREDENTIALS: &str = "BAD_CLIENT_CREDENTIALS";
    /// The worker's join token is missing or wrong.
    pub const JOIN_TOKEN_INVALID: &str = "JOIN_TOKEN_INVALID";
    /// A registration or blob call for a worker id did not prove the key that id is bound to,
    /// or the id is already connected (metadata: `worker_id`).
    pub const WORKER_IDENTITY_MISMATCH: &str = "WORKER_IDENTITY_MISMATCH";
    /// A worker identity proof is missing, stale, malformed or replayed (metadata: `worker_id`).
    pub const WORKER_IDENTITY_INVALID: &str = "WORKER_IDENTITY_INVALID";
    /// An fs tool was pointed at something that is neither a regular file nor a directory (a
    /// FIFO, socket or device), which it never opens (metadata: `path`, `type`).
    pub const NOT_A_REGULAR_FILE: &str = "NOT_A_REGULAR_FILE";
    /// The server is shutting down or not ready.
    pub const NOT_SERVING: &str = "NOT_SERVING";
    /// A store cannot take writes: its file system is below its free-space reserve, or a
    /// write to it failed (metadata: `store`, `path`, `free_bytes`, `min_free_bytes`). Nothing
    /// was applied; free space there and retry: writes resume by themselves.
    pub const STORE_FULL: &str = "STORE_FULL";
    /// A size or count limit was exceeded (metadata: `limit`).
    pub const LIMIT_EXCEEDED: &str = "LIMIT_EXCEEDED";
    /// The worker cannot run commands: its sandbox (or interpreter) does not work on that host
    /// (metadata: `missing`, e.g. `sandbox` or `python`).
    pub const SANDBOX_UNAVAILABLE: &str = "SANDBOX_UNAVAILABLE";
    /// The checkpoint does not exist (or belongs to someone else) (metadata: `checkpoint_id`).
    pub const CHECKPOINT_NOT_FOUND: &str = "CHECKPOINT_NOT_FOUND";
    /// The checkpoint is the parent of other checkpoints (metadata: `checkpoint_id`,
    /// `children`): delete those first.
    pub const CHECKPOINT_HAS_CHILDREN: &str = "CHECKPOINT_HAS_CHILDREN";
    /// A blob a manifest names is not in the blob store (metadata: `hash`, hex, and `missing`,
    /// how many).
    pub const BLOB_MISSING: &str = "BLOB_MISSING";
    /// An uploaded blob's content does not match its hash or size (metadata: `hash`).
    pub const BLOB_CORRUPT: &str = "BLOB_CORRUPT";
    /// The blob store (the coordinator's BlobService) could not be reached from a worker.
    pub const BLOB_STORE_UNAVAILABLE: &str = "BLOB_STORE_UNAVAILABLE";
    /// The session is running another agent turn (metadata: `turn_id`): watch or cancel it.
    pub const TURN_IN_PROGRESS: &str = "TURN_IN_PROGRESS";
    /// The turn does not exist (or belongs to someone else) (metadata: `turn_id`).
    pub const TURN_NOT_FOUND: &str = "TURN_NOT_FOUND";
    /// No agent by that name on the session's worker (metadata: `agent`).
    pub const AGENT_NOT_FOUND: &str = "AGENT_NOT_FOUND";
    /// The session's tool policy does not allow the tool (metadata: `tool`, `session_id`,
    /// `allowed_tools`): call one it allows, or use a session that allows it.
    pub const TOOL_NOT_ALLOWED: &str = "TOOL_NOT_ALLOWED";
    /// The token's client was revoked, or its secret was rotated after the token was issued
    /// (metadata: `client_id`): log in again (with the new secret).
    pub const TOKEN_REVOKED: &str = "TOKEN_REVOKED";
    /// The client was revoked (metadata: `client_id`): it gets no tokens and cannot be rotated.
    pub const CLIENT_REVOKED: &str = "CLIENT_REVOKED";
    /// No client has this id (metadata: `client_id`).
    pub const CLIENT_NOT_FOUND: &str = "CLIENT_NOT_FOUND";
    /// A client with this id exists, or existed and was revoked (metadata: `client_id`).
    pub const CLIENT_EXISTS: &str = "CLIENT_EXISTS";
    /// The bootstrap admin client (HEIST_ADMIN_CLIENT_ID) cannot be changed through the API
    /// (metadata: `client_id`).
    pub const BOOTSTRAP_CLIENT: &str = "BOOTSTRAP_CLIENT";
}

/// A status with an ErrorInfo detail.
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, &str)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// A status with an ErrorInfo and a RetryInfo detail: the call may succeed if retried after
/// `retry_after`.
pub fn retryable(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, &str)],
    retry_after: std::time::Duration,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(code, message, details)
}

/// INVALID_ARGUMENT about one request field.
pub fn invalid_argument(field: &str, message: impl Into<String>) -> Status {
    status(
        Code::InvalidArgument,
        message,
        reason::INVALID_FIELD,
        &[("field", field)],
    )
}

/// The ErrorInfo reason of a status, if it carries one.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// The RetryInfo delay of a status, if it carries one.
pub fn retry_after_of(status: &Status) -> Option<std::time::Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
}

/// The ErrorInfo metadata value `key` of a status, if present.
pub fn metadata_of(status: &Status, key: &str) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_info_round_trips() {
        let st = status(
            Code::ResourceExhausted,
            "all workers are full",
            reason::ALL_WORKERS_FULL,
            &[("workers", "2")],
        );
        assert_eq!(reason_of(&st).as_deref(), Some(reason::ALL_WORKERS_FULL));
        assert_eq!(metadata_of(&st, "workers").as_deref(), Some("2"));
        assert_eq!(st.message(), "all workers are full");
    }
}
