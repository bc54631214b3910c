//! The coordinator's one error type, and its one mapping to a gRPC status. Codes are chosen by
//! what the client should do next (fix the request, log in, retry later, give up); the ErrorInfo
//! reason is what a program branches on.

use std::path::PathBuf;

use heist_proto::{
    errors::{self, reason},
    ids::{CheckpointId, ClientId, RequestId, SessionId, TurnId, WorkerId},
    token::TokenError,
};
use tonic::{Code, Status};

/// The retry advice (RetryInfo) on WORKER_UNAVAILABLE: about one heartbeat.
const WORKER_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is unusable (startup only).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A file under the data directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The sled database failed.
    #[error("the state store failed: {0}")]
    Store(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("stored {what} record is corrupt: {source}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// The cause.
        source: prost::DecodeError,
    },
    /// Signing a token failed.
    #[error("cannot sign a token: {0}")]
    Signing(TokenError),
    /// Hashing or parsing a stored client secret failed.
    #[error("cannot hash a client secret: {0}")]
    SecretHash(String),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A status to return as is: a worker's answer passed through, or a malformed request field.
    #[error("{}", .0.message())]
    Status(#[from] Status),
    /// A malformed id in a request.
    #[error(transparent)]
    InvalidId(#[from] heist_proto::ids::IdError),
    /// A background task panicked or was cancelled.
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// No worker is connected.
    #[error("no workers are connected: start one with `worker --coordinator-addr ...`")]
    NoWorkers,
    /// No connected worker has the requested labels.
    #[error(
        "no connected worker has the labels {labels}: start a worker with them or drop the selector"
    )]
    NoMatchingWorker {
        /// The selector, as `k=v,k=v`.
        labels: String,
    },
    /// Every matching worker is at capacity.
    #[error(
        "all {workers} matching workers are full: close sessions or start more workers, then retry"
    )]
    AllWorkersFull {
        /// How many workers matched the selector.
        workers: usize,
    },
    /// The session does not exist or belongs to another principal.
    #[error("session {0} not found: list yours with `heistctl session ls`")]
    SessionNotFound(SessionId),
    /// The session exists but cannot take calls.
    #[error("session {id} is {state}, not ready: create a new session")]
    SessionNotReady {
        /// The session.
        id: SessionId,
        /// Its state, lower case.
        state: &'static str,
    },
    /// The session's worker was lost and the session is being re-placed from its checkpoint.
    #[error("session {0} is failing over to another worker: retry shortly")]
    SessionRecovering(SessionId),
    /// The session's worker is not connected, or is suspect (silent past its heartbeat
    /// window), or the connection to it broke.
    #[error(
        "worker {0} is unavailable (disconnected or not answering heartbeats): retry shortly; \
         its sessions come back when it does, or fail over if it is lost"
    )]
    WorkerUnavailable(WorkerId),
    /// The caller's deadline passed before the worker answered.
    #[error("the deadline passed before worker {0} answered: retry with a longer deadline")]
    DeadlineExceeded(WorkerId),
    /// No worker has this id.
    #[error("worker {0} not found: list workers with `heistctl workers ls`")]
    WorkerNotFound(WorkerId),
    /// The session's worker does not offer the tool.
    #[error("tool {tool:?} is not offered by worker {worker}: list tools with `heistctl tool ls`")]
    ToolNotFound {
        /// The tool asked for.
        tool: String,
        /// The worker holding the session.
        worker: WorkerId,
    },
    /// The turn does not exist or belongs to another principal.
    #[error("turn {0} not found: list a session's turns with `heistctl transcript SESSION`")]
    TurnNotFound(TurnId),
    /// The session's worker has no agent by that name.
    #[error(
        "agent {agent:?} is not hosted by worker {worker}: list agents with `heistctl agents ls`"
    )]
    AgentNotFound {
        /// The agent asked for.
        agent: String,
        /// The worker holding the session.
        worker: WorkerId,
    },
    /// A request id was reused for a different request.
    #[error("request_id {0} was already used for a different request: send a new request_id")]
    RequestIdReused(RequestId),
    /// Wrong client id or secret (deliberately not saying which).
    #[error("unknown client id or wrong secret: check --client-id and --client-secret")]
    BadClientCredentials,
    /// A token was asked for with a scope the client does not hold.
    #[error("client does not hold scope {0:?}: ask for fewer scopes or leave scopes empty")]
    ScopeNotHeld(String),
    /// Too many failed logins for this client from this address (or from this address).
    #[error("too many failed logins: retry in {retry_after_s} s (check the client id and secret)")]
    LoginThrottled {
        /// Seconds until a retry is heard.
        retry_after_s: u64,
    },
    /// A worker presented no join token or a wrong one.
    #[error("join token missing or wrong: set HEIST_JOIN_TOKEN on the worker to the coordinator's")]
    JoinTokenInvalid,
    /// A registration or blob call for a worker id that proves another key than the one the id
    /// is bound to.
    #[error(
        "worker {0} is enrolled with another key: a worker id belongs to the machine that first \
         joined with it; if that key was lost, re-enrol with HEIST_FORGET_WORKER_KEYS={0} \
         (see docs/OPERATIONS.md)"
    )]
    WorkerIdentityMismatch(WorkerId),
    /// A registration for a worker id that is connected right now, from another stream.
    #[error(
        "worker {0} is already connected: a second registration of a live worker id is refused"
    )]
    WorkerAlreadyConnected(WorkerId),
    /// A worker identity proof that is missing, malformed, stale or replayed.
    #[error("worker {worker}: {why}")]
    WorkerIdentityInvalid {
        /// The worker id claimed.
        worker: String,
        /// What is wrong with the proof.
        why: String,
    },
    /// No bearer token on a call that needs one.
    #[error(
        "no bearer token: run `heistctl login --client-id ... --client-secret ...` \
         or call heist.v1.AuthService/IssueToken"
    )]
    TokenMissing,
    /// The bearer token is forged, malformed, or for another audience or issuer.
    #[error("bearer token rejected ({0}): log in again with `heistctl login`")]
    TokenInvalid(String),
    /// The bearer token has expired.
    #[error("token expired: log in again with `heistctl login`")]
    TokenExpired,
    /// The token verifies, but its client was revoked or rotated its secret since.
    #[error("bearer token refused: {why}")]
    TokenRevoked {
        /// The token's subject.
        client: String,
        /// Why, and what to do.
        why: &'static str,
    },
    /// IssueToken for a revoked client (with its right secret).
    #[error("client {0} was revoked and gets no tokens: ask an administrator for a new client")]
    ClientRevoked(String),
    /// A change to a revoked client.
    #[error("client {0} is revoked: it cannot be changed; create a new client instead")]
    ClientIsRevoked(ClientId),
    /// No client has this id.
    #[error("client {0} not found: list clients with `heistctl admin client ls`")]
    ClientNotFound(ClientId),
    /// CreateClient for an id that exists (or existed and was revoked).
    #[error(
        "client {0} already exists (revoked ids are not reused): choose another id, or rotate \
         its secret with `heistctl admin client rotate {0}`"
    )]
    ClientExists(ClientId),
    /// A rotation or revocation of the bootstrap admin client.
    #[error(
        "client {id} is the bootstrap admin (HEIST_ADMIN_CLIENT_ID) and cannot be {verb} through \
         the API, which could lock the operator out: change HEIST_ADMIN_CLIENT_SECRET and \
         restart the coordinator to rotate it, or set HEIST_ADMIN_CLIENT_ID to another id and \
         restart before revoking it"
    )]
    BootstrapClient {
        /// The bootstrap admin's id.
        id: ClientId,
        /// `rotated` or `revoked`.
        verb: &'static str,
    },
    /// The token lacks the scope the RPC needs.
    #[error("token lacks scope {0:?}: log in with a client that holds it")]
    ScopeMissing(&'static str),
    /// The token allows neither the tool's category nor every tool.
    #[error(
        "token lacks scope {scope:?} for tool `{tool}` (`tools:call` would allow every tool): \
         log in with a client that holds it, or ask for it in IssueToken's scopes"
    )]
    ToolScopeMissing {
        /// The tool asked for.
        tool: String,
        /// The scope that would allow it.
        scope: &'static str,
    },
    /// The session's tool policy does not allow the tool.
    #[error(
        "session {session} allows only {allowed}: tool `{tool}` is outside its tool policy; \
         call one of those, or create a session that allows it \
         (`heistctl session create --allow-tool {tool}`)"
    )]
    ToolNotAllowed {
        /// The tool asked for.
        tool: String,
        /// The session.
        session: SessionId,
        /// The session's policy, comma-separated.
        allowed: String,
    },
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down: retry against it once it is back")]
    ShuttingDown,
    /// The checkpoint does not exist or belongs to another principal.
    #[error("checkpoint {0} not found: list yours with `heistctl checkpoint ls`")]
    CheckpointNotFound(CheckpointId),
    /// The checkpoint is the parent of other checkpoints.
    #[error(
        "checkpoint {id} is the parent of {children} other checkpoint(s): delete those first \
         (newest first), or keep it"
    )]
    CheckpointHasChildren {
        /// The checkpoint.
        id: CheckpointId,
        /// How many checkpoints name it as parent.
        children: usize,
    },
    /// A capture was sent as a delta against a checkpoint removed while it ran.
    #[error(
        "checkpoint {base}, which this capture was taken against, was removed while it ran: \
         take the checkpoint again"
    )]
    DeltaBaseGone {
        /// The removed base.
        base: CheckpointId,
    },
    /// A stored checkpoint's tree cannot be rebuilt from its chain of deltas.
    #[error("the stored tree of checkpoint {id} is incomplete: {why}")]
    BrokenChain {
        /// The checkpoint.
        id: CheckpointId,
        /// What is wrong.
        why: String,
    },
    /// Blobs a manifest names are not in the blob store.
    #[error(
        "{missing} blob(s) of this checkpoint are missing from the blob store (first: {hash}); \
         nothing was changed: the checkpoint cannot be restored, take a new one"
    )]
    BlobMissing {
        /// Hex hash of the first missing blob.
        hash: String,
        /// How many are missing.
        missing: usize,
    },
    /// GetBlobs named a blob the store does not have.
    #[error("blob {0} is not in the blob store")]
    BlobNotFound(String),
    /// An uploaded blob is malformed: wrong hash or size, chunks out of order.
    #[error("blob {hash} rejected: {why}")]
    BlobCorrupt {
        /// Hex hash the uploader announced.
        hash: String,
        /// What was wrong.
        why: String,
    },
    /// The store cannot take writes (its file system is below the reserve, or a write failed):
    /// the mutation was refused before anything was applied.
    #[error("{0}")]
    StoreFull(heist_proto::space::Refusal),
    /// A size or count limit of the blob store or checkpoints.
    #[error("{message}")]
    LimitExceeded {
        /// The setting that sets the limit.
        limit: &'static str,
        /// What exceeded it and what to do.
        message: String,
    },
    /// A principal is over one of its call limits ([`crate::limits`]): nothing ran.
    #[error("{0}")]
    Limited(crate::limits::Refusal),
}

impl Error {
    /// An `Io` error for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<TokenError> for Error {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Expired => Self::TokenExpired,
            TokenError::Invalid(why) => Self::TokenInvalid(why),
        }
    }
}

impl Error {
    /// Whether a call that failed with this error may still have been applied on a worker (no
    /// answer came back, or the answer says the outcome is unknown). Such a call keeps its
    /// intent so a retry with the same request id resumes it; any other error is a definite
    /// "not applied".
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Error::WorkerUnavailable(_) | Error::DeadlineExceeded(_) | Error::Task(_) => true,
            Error::Status(status) => matches!(
                status.code(),
                Code::Unknown
                    | Code::Unavailable
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::Internal
            ),
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        let rich =
            |code, reason, md: &[(&str, &str)]| errors::status(code, msg.clone(), reason, md);
        match &err {
            Error::Status(status) => status.clone(),
            Error::InvalidId(err) => Status::from(err.clone()),
            Error::NoWorkers => rich(Code::ResourceExhausted, reason::NO_WORKERS, &[]),
            Error::NoMatchingWorker { labels } => rich(
                Code::ResourceExhausted,
                reason::NO_MATCHING_WORKER,
                &[("labels", labels)],
            ),
            Error::AllWorkersFull { workers } => rich(
                Code::ResourceExhausted,
                reason::ALL_WORKERS_FULL,
                &[("workers", &workers.to_string())],
            ),
            Error::SessionNotFound(id) => rich(
                Code::NotFound,
                reason::SESSION_NOT_FOUND,
                &[("session_id", id.as_str())],
            ),
            Error::SessionNotReady { id, state } => rich(
                Code::FailedPrecondition,
                reason::SESSION_NOT_READY,
                &[("session_id", id.as_str()), ("state", state)],
            ),
            Error::SessionRecovering(id) => errors::retryable(
                Code::Unavailable,
                msg.clone(),
                reason::SESSION_NOT_READY,
                &[("session_id", id.as_str()), ("state", "recovering")],
                WORKER_RETRY_AFTER,
            ),
            Error::WorkerUnavailable(id) => errors::retryable(
                Code::Unavailable,
                msg.clone(),
                reason::WORKER_UNAVAILABLE,
                &[("worker_id", id.as_str())],
                WORKER_RETRY_AFTER,
            ),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            Error::WorkerNotFound(id) => rich(
                Code::NotFound,
                reason::WORKER_NOT_FOUND,
                &[("worker_id", id.as_str())],
            ),
            Error::ToolNotFound { tool, worker } => rich(
                Code::NotFound,
                reason::TOOL_NOT_FOUND,
                &[("tool", tool), ("worker_id", worker.as_str())],
            ),
            Error::TurnNotFound(id) => rich(
                Code::NotFound,
                reason::TURN_NOT_FOUND,
                &[("turn_id", id.as_str())],
            ),
            Error::AgentNotFound { agent, worker } => rich(
                Code::NotFound,
                reason::AGENT_NOT_FOUND,
                &[("agent", agent), ("worker_id", worker.as_str())],
            ),
            Error::RequestIdReused(id) => rich(
                Code::InvalidArgument,
                reason::REQUEST_ID_REUSED,
                &[("request_id", id.as_str())],
            ),
            Error::BadClientCredentials => {
                rich(Code::Unauthenticated, reason::BAD_CLIENT_CREDENTIALS, &[])
            }
            Error::ScopeNotHeld(scope) => rich(
                Code::PermissionDenied,
                reason::SCOPE_MISSING,
                &[("scope", scope)],
            ),
            Error::JoinTokenInvalid => rich(Code::Unauthenticated, reason::JOIN_TOKEN_INVALID, &[]),
            Error::Limited(refusal) => {
                let mut status = errors::retryable(
                    Code::ResourceExhausted,
                    msg.clone(),
                    reason::LIMIT_EXCEEDED,
                    &[
                        ("limit", refusal.limit.name()),
                        ("client_id", &refusal.principal),
                    ],
                    refusal.retry_after,
                );
                status
                    .metadata_mut()
                    .insert("retry-after", refusal.retry_after_s().into());
                status
            }
            Error::LoginThrottled { retry_after_s } => rich(
                Code::ResourceExhausted,
                reason::LIMIT_EXCEEDED,
                &[
                    ("limit", "login_failures"),
                    ("retry_after_s", &retry_after_s.to_string()),
                ],
            ),
            Error::WorkerIdentityMismatch(id) => rich(
                Code::PermissionDenied,
                reason::WORKER_IDENTITY_MISMATCH,
                &[("worker_id", id.as_str())],
            ),
            Error::WorkerAlreadyConnected(id) => rich(
                Code::AlreadyExists,
                reason::WORKER_IDENTITY_MISMATCH,
                &[("worker_id", id.as_str())],
            ),
            Error::WorkerIdentityInvalid { worker, .. } => rich(
                Code::Unauthenticated,
                reason::WORKER_IDENTITY_INVALID,
                &[("worker_id", worker)],
            ),
            Error::TokenMissing => rich(Code::Unauthenticated, reason::TOKEN_MISSING, &[]),
            Error::TokenInvalid(_) => rich(Code::Unauthenticated, reason::TOKEN_INVALID, &[]),
            Error::TokenExpired => rich(Code::Unauthenticated, reason::TOKEN_EXPIRED, &[]),
            Error::TokenRevoked { client, .. } => rich(
                Code::Unauthenticated,
                reason::TOKEN_REVOKED,
                &[("client_id", client)],
            ),
            Error::ClientRevoked(id) => rich(
                Code::Unauthenticated,
                reason::CLIENT_REVOKED,
                &[("client_id", id)],
            ),
            Error::ClientIsRevoked(id) => rich(
                Code::FailedPrecondition,
                reason::CLIENT_REVOKED,
                &[("client_id", id.as_str())],
            ),
            Error::ClientNotFound(id) => rich(
                Code::NotFound,
                reason::CLIENT_NOT_FOUND,
                &[("client_id", id.as_str())],
            ),
            Error::ClientExists(id) => rich(
                Code::AlreadyExists,
                reason::CLIENT_EXISTS,
                &[("client_id", id.as_str())],
            ),
            Error::BootstrapClient { id, .. } => rich(
                Code::FailedPrecondition,
                reason::BOOTSTRAP_CLIENT,
                &[("client_id", id.as_str())],
            ),
            Error::ScopeMissing(scope) => rich(
                Code::PermissionDenied,
                reason::SCOPE_MISSING,
                &[("scope", scope)],
            ),
            Error::ToolScopeMissing { tool, scope } => rich(
                Code::PermissionDenied,
                reason::SCOPE_MISSING,
                &[("scope", scope), ("tool", tool)],
            ),
            Error::ToolNotAllowed {
                tool,
                session,
                allowed,
            } => rich(
                Code::PermissionDenied,
                reason::TOOL_NOT_ALLOWED,
                &[
                    ("tool", tool),
                    ("session_id", session.as_str()),
                    ("allowed_tools", allowed),
                ],
            ),
            Error::ShuttingDown => rich(Code::Unavailable, reason::NOT_SERVING, &[]),
            Error::CheckpointNotFound(id) => rich(
                Code::NotFound,
                reason::CHECKPOINT_NOT_FOUND,
                &[("checkpoint_id", id.as_str())],
            ),
            Error::CheckpointHasChildren { id, children } => rich(
                Code::FailedPrecondition,
                reason::CHECKPOINT_HAS_CHILDREN,
                &[
                    ("checkpoint_id", id.as_str()),
                    ("children", &children.to_string()),
                ],
            ),
            Error::BlobMissing { hash, missing } => rich(
                Code::FailedPrecondition,
                reason::BLOB_MISSING,
                &[("hash", hash), ("missing", &missing.to_string())],
            ),
            Error::DeltaBaseGone { .. } => Status::aborted(msg),
            Error::BrokenChain { .. } => Status::internal(msg),
            Error::BlobNotFound(hash) => {
                rich(Code::NotFound, reason::BLOB_MISSING, &[("hash", hash)])
            }
            Error::BlobCorrupt { hash, .. } => rich(
                Code::InvalidArgument,
                reason::BLOB_CORRUPT,
                &[("hash", hash)],
            ),
            Error::LimitExceeded { limit, .. } => rich(
                Code::ResourceExhausted,
                reason::LIMIT_EXCEEDED,
                &[("limit", limit)],
            ),
            Error::StoreFull(refusal) => refusal.status(),
            Error::Io { .. } | Error::Store(_) => Status::unavailable(msg),
            Error::Task(_) => Status::unavailable(msg),
            Error::InvalidConfig(_)
            | Error::Corrupt { .. }
            | Error::Signing(_)
            | Error::SecretHash(_)
            | Error::Transport(_)
            | Error::Reflection(_) => Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_placement_errors_to_resource_exhausted_with_reasons() {
        let st = Status::from(Error::AllWorkersFull { workers: 2 });
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(
            errors::reason_of(&st).as_deref(),
            Some(reason::ALL_WORKERS_FULL)
        );
        assert!(st.message().contains("all 2 matching workers are full"));
    }

    #[test]
    fn passes_worker_statuses_through() {
        let original = errors::status(
            Code::InvalidArgument,
            "bad field",
            reason::SCHEMA_VIOLATION,
            &[("field", "path")],
        );
        let st = Status::from(Error::Status(original));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(errors::metadata_of(&st, "field").as_deref(), Some("path"));
    }
}
