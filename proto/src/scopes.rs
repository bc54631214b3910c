//! Scope names carried in the token's `scope` claim, the scope each public RPC requires, and
//! the allow-list of the paths served without a token.
//!
//! Access fails closed: a path is public only when [`PUBLIC`] lists it; every other path needs
//! a valid token, and a path no table knows needs [`ADMIN`].

/// Read workers (ClusterService).
pub const CLUSTER_READ: &str = "cluster:read";
/// Read the caller's sessions.
pub const SESSIONS_READ: &str = "sessions:read";
/// Create and close sessions.
pub const SESSIONS_WRITE: &str = "sessions:write";
/// List tools.
pub const TOOLS_READ: &str = "tools:read";
/// Call tools.
pub const TOOLS_CALL: &str = "tools:call";
/// Read the caller's checkpoints.
pub const CHECKPOINTS_READ: &str = "checkpoints:read";
/// Create, restore, fork and delete checkpoints.
pub const CHECKPOINTS_WRITE: &str = "checkpoints:write";
/// Run and cancel agent turns (reading them needs sessions:read).
pub const AGENTS_RUN: &str = "agents:run";
/// Play heist games: start, watch, analyze, guess, statistics (one's own games).
pub const HEIST_PLAY: &str = "heist:play";
/// Read and verify the audit log.
pub const AUDIT_READ: &str = "audit:read";
/// Everything, including administration.
pub const ADMIN: &str = "admin";

/// Every scope, in the order they are documented.
pub const ALL: &[&str] = &[
    CLUSTER_READ,
    SESSIONS_READ,
    SESSIONS_WRITE,
    TOOLS_READ,
    TOOLS_CALL,
    CHECKPOINTS_READ,
    CHECKPOINTS_WRITE,
    AGENTS_RUN,
    HEIST_PLAY,
    AUDIT_READ,
    ADMIN,
];

/// The paths served without a bearer token, exactly (gRPC methods and HTTP routes). Every other
/// path needs a valid token. WorkerControl and BlobService are here because they check the
/// workers' join token themselves; health, reflection and the HTTP probes reveal nothing.
pub const PUBLIC: &[&str] = &[
    "/heist.v1.AuthService/IssueToken",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/heist.v1.WorkerControl/Join",
    "/heist.v1.BlobService/FindMissingBlobs",
    "/heist.v1.BlobService/PutBlobs",
    "/heist.v1.BlobService/GetBlobs",
    "/healthz",
    "/readyz",
    // The public keys that verify the coordinator's tokens (JWKS): public by nature.
    "/.well-known/jwks.json",
    // Checks its own token (cluster:read) unless the operator made it public.
    "/metrics",
    // OAuth discovery (RFC 9728, RFC 8414) and the client-credentials token endpoint: what an
    // MCP client reads before it has a token.
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/oauth-authorization-server",
    "/oauth/token",
];

/// The paths that need a valid token but no particular scope: the MCP endpoint, which checks
/// each tool's scope itself (the tool's gRPC method's scope, per call and in `tools/list`).
pub const TOKEN_ONLY: &[&str] = &["/mcp"];

/// What a path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token: the path is on the [`PUBLIC`] allow-list.
    Public,
    /// A valid token carrying this scope.
    Scope(&'static str),
    /// A valid token, whatever its scopes ([`TOKEN_ONLY`]).
    Token,
}

/// What `path` needs: [`Access::Public`] only for the allow-list, the RPC's scope for a known
/// RPC, and [`ADMIN`] for anything else (fail closed).
pub fn access(path: &str) -> Access {
    if PUBLIC.contains(&path) {
        return Access::Public;
    }
    if TOKEN_ONLY.contains(&path) {
        return Access::Token;
    }
    Access::Scope(scope_for(path).unwrap_or(ADMIN))
}

/// The scope a known public RPC requires, by its gRPC path
/// (`/heist.v1.SessionService/CreateSession`); `None` for a path this table does not know.
pub fn scope_for(path: &str) -> Option<&'static str> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("heist.v1.ClusterService", "ListWorkers" | "GetWorker") => CLUSTER_READ,
        ("heist.v1.SessionService", "GetSession" | "ListSessions") => SESSIONS_READ,
        ("heist.v1.SessionService", "CreateSession" | "CloseSession") => SESSIONS_WRITE,
        ("heist.v1.ToolService", "ListTools") => TOOLS_READ,
        ("heist.v1.ToolService", "CallTool" | "CallToolStream") => TOOLS_CALL,
        ("heist.v1.CheckpointService", "GetCheckpoint" | "ListCheckpoints") => CHECKPOINTS_READ,
        (
            "heist.v1.CheckpointService",
            "CreateCheckpoint" | "RestoreCheckpoint" | "ForkSession" | "DeleteCheckpoint",
        ) => CHECKPOINTS_WRITE,
        ("heist.v1.AgentService", "RunTurn" | "CancelTurn") => AGENTS_RUN,
        ("heist.v1.AgentService", "ListAgents" | "WatchTurn" | "GetTurn" | "GetTranscript") => {
            SESSIONS_READ
        }
        ("heist.v1.HeistService", _) => HEIST_PLAY,
        ("heist.v1.AuditService", "ListAudit" | "TailAudit" | "VerifyAudit") => AUDIT_READ,
        // Managing clients is administration: whoever may create a client may create an admin.
        (
            "heist.v1.ClientService",
            "CreateClient" | "ListClients" | "RotateClientSecret" | "RevokeClient"
            | "RotateSigningKey",
        ) => ADMIN,
        _ => return None,
    })
}

/// Whether a space-separated `scope` claim grants `needed` (`admin` grants everything).
pub fn grants(scope_claim: &str, needed: &str) -> bool {
    scope_claim
        .split_ascii_whitespace()
        .any(|s| s == needed || s == ADMIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_rpcs_to_scopes() {
        let cases = [
            ("/heist.v1.SessionService/CreateSession", SESSIONS_WRITE),
            ("/heist.v1.SessionService/ListSessions", SESSIONS_READ),
            ("/heist.v1.ToolService/CallTool", TOOLS_CALL),
            (
                "/heist.v1.CheckpointService/ListCheckpoints",
                CHECKPOINTS_READ,
            ),
            ("/heist.v1.CheckpointService/ForkSession", CHECKPOINTS_WRITE),
            ("/heist.v1.AgentService/RunTurn", AGENTS_RUN),
            ("/heist.v1.AuditService/VerifyAudit", AUDIT_READ),
            ("/heist.v1.AgentService/GetTranscript", SESSIONS_READ),
            ("/heist.v1.HeistService/Guess", HEIST_PLAY),
            ("/heist.v1.ClientService/CreateClient", ADMIN),
            ("/heist.v1.ClientService/RevokeClient", ADMIN),
        ];
        for (path, scope) in cases {
            assert_eq!(access(path), Access::Scope(scope), "{path}");
        }
        assert_eq!(access("/heist.v1.BlobService/PutBlobs"), Access::Public);
        assert_eq!(access("/heist.v1.AuthService/IssueToken"), Access::Public);
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(access("/healthz"), Access::Public);
        // Checks its own token (see the coordinator's `web`).
        assert_eq!(access("/metrics"), Access::Public);
        assert_eq!(access("/oauth/token"), Access::Public);
        assert_eq!(access("/mcp"), Access::Token);
    }

    #[test]
    fn unknown_paths_fail_closed() {
        for path in [
            "/heist.v1.NewService/Anything",
            "/heist.v1.SessionService/NewMethod",
            "/heist.v1.AuthService/Other",
            "/metrics/other",
            "/",
            "",
        ] {
            assert_eq!(access(path), Access::Scope(ADMIN), "{path:?}");
        }
    }

    #[test]
    fn admin_grants_everything() {
        assert!(grants("admin", TOOLS_CALL));
        assert!(grants("tools:read tools:call", TOOLS_CALL));
        assert!(!grants("tools:read", TOOLS_CALL));
        assert!(!grants("", TOOLS_CALL));
    }
}
