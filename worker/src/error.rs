//! The worker's one error type and its one mapping to `tonic::Status`.
//!
//! Codes are chosen by what the caller should do: UNAVAILABLE means "retry later or elsewhere",
//! INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED mean "change the request", UNAUTHENTICATED
//! means "get a valid credential". Every status carries an ErrorInfo reason.

use std::path::PathBuf;

use heist_proto::errors::{self, reason};
use tonic::{Code, Status};

/// Everything that can go wrong on a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is wrong; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding, reading or writing something the worker itself needs.
    #[error("{context}: {source}")]
    Io {
        /// What the worker was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The worker's state store or blob cache cannot take writes (its file system is below
    /// HEIST_WORKER_MIN_FREE_BYTES): the call was refused before it was applied.
    #[error("{0}")]
    StoreFull(heist_proto::space::Refusal),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// No coordinator has accepted this worker yet, so no credential can be checked.
    #[error("not registered with a coordinator yet: retry once the worker has joined the cluster")]
    NotRegistered,
    /// The call carries no usable credential.
    #[error("{message}")]
    Unauthenticated {
        /// ErrorInfo reason (TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED).
        reason: &'static str,
        /// What was wrong and what to do.
        message: String,
    },
    /// The worker is draining and takes no new sessions.
    #[error("worker is draining and takes no new sessions: place the session on another worker")]
    Draining,
    /// The worker holds `max` sessions already.
    #[error("worker is full ({max} sessions open): close a session or use another worker")]
    Full {
        /// MAX_SESSIONS.
        max: u32,
    },
    /// The session is not open on this worker.
    #[error("session {0} is not open on this worker: open it first")]
    SessionNotFound(String),
    /// No tool by that name.
    #[error("tool {name:?} does not exist: available tools are {available}")]
    ToolNotFound {
        /// Requested name.
        name: String,
        /// Comma-separated catalogue.
        available: String,
    },
    /// Arguments violate the tool's input schema.
    #[error("{message}")]
    SchemaViolation {
        /// Offending property path ("path", "variables.x"; "" for the root).
        field: String,
        /// `argument `path`: 5 is not of type "string"`.
        message: String,
    },
    /// A request field is malformed.
    #[error("{message}")]
    InvalidArgument {
        /// Field name.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A path leaves the session workspace.
    #[error("path {path:?} {why}: paths must be relative and stay inside the session workspace")]
    PathOutside {
        /// The path as the caller sent it.
        path: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// An fs tool was pointed at a FIFO, socket or device.
    #[error(
        "`{path}` is a {kind}, not a regular file or directory: the fs tools only open regular \
         files and directories (so a FIFO or device can never block them); use exec to work \
         with it, or fs.delete to remove it"
    )]
    NotRegularFile {
        /// The path as the caller sent it.
        path: String,
        /// What it is ("fifo", "socket", "character device", "block device").
        kind: &'static str,
    },
    /// A size or count limit would be exceeded.
    #[error("{message}")]
    LimitExceeded {
        /// Name of the limit (e.g. "max_file_bytes").
        limit: &'static str,
        /// What exceeded it.
        message: String,
    },
    /// The session runs another turn.
    #[error(
        "session {session} is running turn {turn}: watch it with WatchTurn, or cancel it first"
    )]
    TurnInProgress {
        /// Session.
        session: String,
        /// The running turn.
        turn: String,
    },
    /// No such turn on this worker (never started here, or forgotten after retention).
    #[error("turn {0} is not known to this worker")]
    TurnNotFound(String),
    /// No agent by that name.
    #[error("agent {name:?} does not exist: available agents are {available}")]
    AgentNotFound {
        /// Requested name.
        name: String,
        /// Comma-separated names.
        available: String,
    },
    /// The turn's grant is missing, forged or for another turn.
    #[error("the turn grant is not valid ({0}): start turns through the coordinator")]
    BadGrant(String),
    /// The agent state could not be read or written.
    #[error(transparent)]
    AgentState(#[from] crate::agent::StateError),
    /// The worker stopped waiting for the call (it is shutting down).
    #[error(
        "the worker is shutting down and stopped the call: retry it, it will be placed elsewhere"
    )]
    Stopped,
    /// The caller's deadline passed while the tool ran.
    #[error("the tool did not finish before the call's deadline")]
    DeadlineExceeded,
    /// Commands cannot run here: the sandbox (or the interpreter) does not work on this host.
    #[error("{message}")]
    SandboxUnavailable {
        /// What is missing ("sandbox", "python").
        missing: &'static str,
        /// Why, and what an operator can do.
        message: String,
    },
    /// A session workspace could not be created or removed.
    #[error("workspace {path}: {source}")]
    Workspace {
        /// Workspace directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A bug or an environment problem the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),
    /// A request id this worker applied with other arguments.
    #[error("request id {0:?} was used for a different call: use a new request id")]
    RequestIdReused(String),
    /// The call with this request id was interrupted while it was being applied.
    #[error(
        "the call with request id {0:?} was interrupted while it was applied, so whether it took \
         effect is unknown: inspect the workspace and retry with a new request id"
    )]
    OutcomeUnknown(String),
    /// The coordinator's blob store refused or failed a call.
    #[error("the coordinator's blob store failed: {}", .0.message())]
    BlobStore(Status),
    /// A blob a manifest names is not in the blob store.
    #[error(
        "blob {0} of the checkpoint is missing from the blob store; the workspace was left as \
         it was"
    )]
    BlobMissing(String),
    /// A file changed while it was being captured.
    #[error("{0} changed while the workspace was being captured: retry the checkpoint")]
    ChangedDuringCapture(String),
    /// The workspace holds something a checkpoint cannot record.
    #[error("cannot checkpoint {path:?}: {why}")]
    Uncapturable {
        /// Path inside the workspace.
        path: String,
        /// Why, and what to do.
        why: String,
    },
}

impl Error {
    /// Whether a call that failed with this error may have changed something before it
    /// stopped. Only errors raised before a tool acts (bad request, unknown session or tool,
    /// a refused limit, no sandbox) are known to have changed nothing.
    pub fn interrupted(&self) -> bool {
        !matches!(
            self,
            Error::NotRegistered
                | Error::Unauthenticated { .. }
                | Error::Draining
                | Error::Full { .. }
                | Error::SessionNotFound(_)
                | Error::ToolNotFound { .. }
                | Error::SchemaViolation { .. }
                | Error::InvalidArgument { .. }
                | Error::PathOutside { .. }
                | Error::NotRegularFile { .. }
                | Error::LimitExceeded { .. }
                | Error::SandboxUnavailable { .. }
                | Error::RequestIdReused(_)
                | Error::OutcomeUnknown(_)
        )
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        let with = |code, why, md: &[(&str, &str)]| errors::status(code, message.clone(), why, md);
        match &err {
            Error::StoreFull(refusal) => refusal.status(),
            Error::NotRegistered | Error::Draining | Error::Stopped => {
                with(Code::Unavailable, reason::NOT_SERVING, &[])
            }
            Error::Unauthenticated { reason, .. } => with(Code::Unauthenticated, reason, &[]),
            Error::Full { .. } => with(
                Code::ResourceExhausted,
                reason::LIMIT_EXCEEDED,
                &[("limit", "max_sessions")],
            ),
            Error::SessionNotFound(id) => with(
                Code::NotFound,
                reason::SESSION_NOT_FOUND,
                &[("session_id", id)],
            ),
            Error::ToolNotFound { name, .. } => {
                with(Code::NotFound, reason::TOOL_NOT_FOUND, &[("tool", name)])
            }
            Error::SchemaViolation { field, .. } => with(
                Code::InvalidArgument,
                reason::SCHEMA_VIOLATION,
                &[("field", field)],
            ),
            Error::InvalidArgument { field, .. } => with(
                Code::InvalidArgument,
                reason::INVALID_FIELD,
                &[("field", field)],
            ),
            Error::PathOutside { path, .. } => with(
                Code::InvalidArgument,
                reason::PATH_OUTSIDE_WORKSPACE,
                &[("path", path)],
            ),
            Error::NotRegularFile { path, kind } => with(
                Code::FailedPrecondition,
                reason::NOT_A_REGULAR_FILE,
                &[("path", path), ("type", kind)],
            ),
            Error::LimitExceeded { limit, .. } => with(
                Code::ResourceExhausted,
                reason::LIMIT_EXCEEDED,
                &[("limit", limit)],
            ),
            Error::DeadlineExceeded => Status::deadline_exceeded(message),
            Error::TurnInProgress { turn, .. } => with(
                Code::FailedPrecondition,
                reason::TURN_IN_PROGRESS,
                &[("turn_id", turn)],
            ),
            Error::TurnNotFound(turn) => {
                with(Code::NotFound, reason::TURN_NOT_FOUND, &[("turn_id", turn)])
            }
            Error::AgentNotFound { name, .. } => {
                with(Code::NotFound, reason::AGENT_NOT_FOUND, &[("agent", name)])
            }
            Error::BadGrant(_) => with(Code::PermissionDenied, reason::TOKEN_INVALID, &[]),
            Error::AgentState(_) => Status::internal(message),
            Error::SandboxUnavailable { missing, .. } => with(
                Code::FailedPrecondition,
                reason::SANDBOX_UNAVAILABLE,
                &[("missing", missing)],
            ),
            Error::BlobStore(status) => match errors::reason_of(status) {
                Some(why) => {
                    let why = why.clone();
                    errors::status(status.code(), message, &why, &[])
                }
                None => with(Code::Unavailable, reason::BLOB_STORE_UNAVAILABLE, &[]),
            },
            Error::BlobMissing(hash) => with(
                Code::FailedPrecondition,
                reason::BLOB_MISSING,
                &[("hash", hash)],
            ),
            Error::ChangedDuringCapture(_) => Status::aborted(message),
            Error::Uncapturable { path, .. } => with(
                Code::FailedPrecondition,
                reason::INVALID_FIELD,
                &[("field", "workspace"), ("path", path)],
            ),
            Error::RequestIdReused(id) => with(
                Code::InvalidArgument,
                reason::REQUEST_ID_REUSED,
                &[("request_id", id)],
            ),
            Error::OutcomeUnknown(id) => with(
                Code::Aborted,
                reason::OUTCOME_UNKNOWN,
                &[("request_id", id)],
            ),
            Error::Config(_)
            | Error::Io { .. }
            | Error::Transport(_)
            | Error::Workspace { .. }
            | Error::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_errors_to_codes_and_reasons() {
        let cases = [
            (
                Error::NotRegistered,
                Code::Unavailable,
                Some(reason::NOT_SERVING),
            ),
            (
                Error::Draining,
                Code::Unavailable,
                Some(reason::NOT_SERVING),
            ),
            (
                Error::Full { max: 2 },
                Code::ResourceExhausted,
                Some(reason::LIMIT_EXCEEDED),
            ),
            (
                Error::SessionNotFound("s-1".into()),
                Code::NotFound,
                Some(reason::SESSION_NOT_FOUND),
            ),
            (
                Error::PathOutside {
                    path: "/etc".into(),
                    why: "is absolute",
                },
                Code::InvalidArgument,
                Some(reason::PATH_OUTSIDE_WORKSPACE),
            ),
            (Error::Internal("x".into()), Code::Internal, None),
        ];
        for (err, code, why) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(errors::reason_of(&status).as_deref(), why);
        }
    }

    #[test]
    fn path_errors_carry_the_path() {
        let status = Status::from(Error::PathOutside {
            path: "../x".into(),
            why: "leaves the workspace",
        });
        assert_eq!(
            errors::metadata_of(&status, "path").as_deref(),
            Some("../x")
        );
        assert!(status.message().contains("inside the session workspace"));
    }
}
