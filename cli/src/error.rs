//! The one error type of heistctl and the exit code each error maps to.
//!
//! Exit codes are part of the CLI's contract (scripts branch on them):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other error |
//! | 2 | usage: bad flags or flag values (clap uses 2 as well) |
//! | 3 | authentication or authorization: not logged in, token expired, UNAUTHENTICATED, PERMISSION_DENIED |
//! | 4 | not found (NOT_FOUND) |
//! | 5 | unavailable or out of capacity (UNAVAILABLE, RESOURCE_EXHAUSTED, coordinator unreachable) |
//! | 6 | `tool call`: the tool ran and reported an error (`is_error`) |
//! | 130 | interrupted (Ctrl-C) before the command finished |

use std::{path::PathBuf, process::ExitStatus};

use tonic::Code;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: any other error.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: authentication or authorization problem.
pub const EXIT_AUTH: u8 = 3;
/// Exit code: something was not found.
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit code: unavailable or out of capacity; trying again later may help.
pub const EXIT_UNAVAILABLE: u8 = 5;
/// Exit code: the tool ran and reported an error.
pub const EXIT_TOOL_ERROR: u8 = 6;
/// Exit code: interrupted by Ctrl-C/SIGTERM before finishing (128 + SIGINT, as shells do).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Everything that can go wrong in heistctl. Messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with an error status.
    #[error("{}", status_message(.0))]
    Rpc(#[from] tonic::Status),
    /// No connection could be made to the coordinator.
    #[error(
        "cannot reach the coordinator at {url}: {detail}; is it running, and does it serve this scheme? (https:// with --ca-cert for a TLS coordinator, http:// for plaintext; set --coordinator or HEIST_COORDINATOR)"
    )]
    Unreachable {
        /// Coordinator URL.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The coordinator URL does not parse.
    #[error("{url:?} is not a valid coordinator URL: use e.g. http://127.0.0.1:50051")]
    BadUrl {
        /// The URL as given.
        url: String,
    },
    /// No token is cached for this coordinator and none was given.
    #[error(
        "not logged in to {url}: run `heistctl login --client-id ID --client-secret-stdin` (or pass --token / HEIST_TOKEN)"
    )]
    NotLoggedIn {
        /// Coordinator URL.
        url: String,
    },
    /// The cached token has expired.
    #[error("the cached token for {url} has expired: run `heistctl login` again")]
    TokenExpired {
        /// Coordinator URL.
        url: String,
    },
    /// A flag value is malformed.
    #[error("{0}")]
    Usage(String),
    /// The credentials cache could not be read or written.
    #[error("credentials file {}: {source}", path.display())]
    Credentials {
        /// Path of the cache file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// A local I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// The `coordinator` or `worker` binary is nowhere to be found.
    #[error(
        "cannot find the `{name}` binary (looked in {searched}): run `make build`, or point --bin-dir (HEIST_BIN_DIR) at the directory holding it"
    )]
    BinaryNotFound {
        /// Binary name.
        name: String,
        /// Where we looked.
        searched: String,
    },
    /// A local cluster process exited while it should be running.
    #[error(
        "{name} exited early ({status}); last lines of {}:\n{tail}",
        log.display()
    )]
    ChildExited {
        /// Process name (`coordinator`, `worker-1`, ...).
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A local cluster did not become ready in time.
    #[error("{what} was not ready after {timeout_s} s: see the logs in {}", data_dir.display())]
    NotReady {
        /// What was being waited for.
        what: String,
        /// How long we waited.
        timeout_s: u64,
        /// Where the logs are.
        data_dir: PathBuf,
    },
    /// A `dev demo` step did not behave as expected.
    #[error("demo step failed: {0}")]
    Demo(String),
    /// Ctrl-C or SIGTERM arrived before the command finished.
    #[error("interrupted")]
    Interrupted,
    /// The coordinator's MCP endpoint could not be used.
    #[error("MCP: {0}")]
    Mcp(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Rpc(status) => exit_code_for(status.code()),
            Self::Unreachable { .. } => EXIT_UNAVAILABLE,
            Self::BadUrl { .. } | Self::Usage(_) => EXIT_USAGE,
            Self::NotLoggedIn { .. } | Self::TokenExpired { .. } => EXIT_AUTH,
            Self::Credentials { .. }
            | Self::Io { .. }
            | Self::BinaryNotFound { .. }
            | Self::ChildExited { .. }
            | Self::NotReady { .. }
            | Self::Demo(_)
            | Self::Mcp(_) => EXIT_ERROR,
            Self::Interrupted => EXIT_INTERRUPTED,
        }
    }

    /// The ErrorInfo reason the coordinator attached, if any.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Rpc(status) => heist_proto::errors::reason_of(status),
            _ => None,
        }
    }

    /// The gRPC status code, when the error came from the coordinator.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }

    /// How heistctl reports this error on stderr: `error: <message>`, then `reason: <X>` when
    /// the status carries an ErrorInfo reason.
    pub fn report(&self) -> String {
        let mut text = format!("error: {self}\n");
        if let Some(reason) = self.reason() {
            text.push_str(&format!("reason: {reason}\n"));
        }
        text
    }

    /// An I/O error with context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Exit code for a gRPC status code.
pub fn exit_code_for(code: Code) -> u8 {
    match code {
        Code::Ok => EXIT_OK,
        Code::Unauthenticated | Code::PermissionDenied => EXIT_AUTH,
        Code::NotFound => EXIT_NOT_FOUND,
        Code::Unavailable | Code::ResourceExhausted => EXIT_UNAVAILABLE,
        _ => EXIT_ERROR,
    }
}

/// The status message, or the code's description when the server sent none.
fn status_message(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else if is_broken_connection(status) {
        // What a plaintext client sees from a TLS port: its TLS alert is not HTTP/2.
        format!(
            "{}: the connection broke at the HTTP/2 level; if the coordinator serves TLS, use \
             https:// with --ca-cert",
            status.message()
        )
    } else {
        status.message().to_owned()
    }
}

/// A call that failed because the HTTP/2 connection broke (the transport's own errors, not an
/// answer of the coordinator). The code varies with where the break is noticed (a TLS alert
/// read as HTTP/2 is UNKNOWN, UNAVAILABLE, CANCELLED or INTERNAL from one run to the next), so
/// the transport's own message prefix decides.
fn is_broken_connection(status: &tonic::Status) -> bool {
    const BROKEN: [&str; 5] = [
        "transport error",
        "h2 protocol error",
        "operation was canceled",
        "connection reset",
        "connection closed",
    ];
    status.code() != Code::Ok && BROKEN.iter().any(|b| status.message().starts_with(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_says_to_try_tls_whatever_its_code() {
        for code in [
            Code::Unknown,
            Code::Unavailable,
            Code::Cancelled,
            Code::Internal,
        ] {
            let status = tonic::Status::new(code, "h2 protocol error: http2 error");
            assert!(status_message(&status).contains("--ca-cert"), "{code:?}");
        }
        let answered = tonic::Status::internal("the store failed");
        assert_eq!(status_message(&answered), "the store failed");
    }

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        assert_eq!(exit_code_for(Code::Unauthenticated), EXIT_AUTH);
        assert_eq!(exit_code_for(Code::PermissionDenied), EXIT_AUTH);
        assert_eq!(exit_code_for(Code::NotFound), EXIT_NOT_FOUND);
        assert_eq!(exit_code_for(Code::Unavailable), EXIT_UNAVAILABLE);
        assert_eq!(exit_code_for(Code::ResourceExhausted), EXIT_UNAVAILABLE);
        assert_eq!(exit_code_for(Code::InvalidArgument), EXIT_ERROR);
        assert_eq!(exit_code_for(Code::Internal), EXIT_ERROR);
    }

    #[test]
    fn local_errors_have_exit_codes() {
        let url = "http://x".to_owned();
        assert_eq!(
            Error::NotLoggedIn { url: url.clone() }.exit_code(),
            EXIT_AUTH
        );
        assert_eq!(
            Error::TokenExpired { url: url.clone() }.exit_code(),
            EXIT_AUTH
        );
        assert_eq!(
            Error::Unreachable {
                url,
                detail: String::new()
            }
            .exit_code(),
            EXIT_UNAVAILABLE
        );
        assert_eq!(Error::Usage("x".into()).exit_code(), EXIT_USAGE);
    }

    #[test]
    fn rpc_errors_expose_their_reason() {
        let st = heist_proto::errors::status(
            Code::NotFound,
            "no such session",
            heist_proto::errors::reason::SESSION_NOT_FOUND,
            &[],
        );
        let err = Error::from(st);
        assert_eq!(err.to_string(), "no such session");
        assert_eq!(err.reason().as_deref(), Some("SESSION_NOT_FOUND"));
        assert_eq!(err.exit_code(), EXIT_NOT_FOUND);
        assert_eq!(
            err.report(),
            "error: no such session\nreason: SESSION_NOT_FOUND\n"
        );
    }
}
