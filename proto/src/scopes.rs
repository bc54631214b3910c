//! Scope names carried in the token's `scope` claim, and the scope each public RPC requires.

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
    ADMIN,
];

/// Scope required by a public RPC, by its gRPC path (`/heist.v1.SessionService/CreateSession`).
/// `None` means the path needs no token (IssueToken, health, reflection) or is not public
/// (WorkerControl and BlobService check the workers' join token themselves).
pub fn required_for(path: &str) -> Option<&'static str> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("heist.v1.ClusterService", _) => CLUSTER_READ,
        ("heist.v1.SessionService", "GetSession" | "ListSessions") => SESSIONS_READ,
        ("heist.v1.SessionService", _) => SESSIONS_WRITE,
        ("heist.v1.ToolService", "ListTools") => TOOLS_READ,
        ("heist.v1.ToolService", _) => TOOLS_CALL,
        ("heist.v1.CheckpointService", "GetCheckpoint" | "ListCheckpoints") => CHECKPOINTS_READ,
        ("heist.v1.CheckpointService", _) => CHECKPOINTS_WRITE,
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
        assert_eq!(
            required_for("/heist.v1.SessionService/CreateSession"),
            Some(SESSIONS_WRITE)
        );
        assert_eq!(
            required_for("/heist.v1.SessionService/ListSessions"),
            Some(SESSIONS_READ)
        );
        assert_eq!(
            required_for("/heist.v1.ToolService/CallTool"),
            Some(TOOLS_CALL)
        );
        assert_eq!(
            required_for("/heist.v1.CheckpointService/ListCheckpoints"),
            Some(CHECKPOINTS_READ)
        );
        assert_eq!(
            required_for("/heist.v1.CheckpointService/ForkSession"),
            Some(CHECKPOINTS_WRITE)
        );
        assert_eq!(required_for("/heist.v1.BlobService/PutBlobs"), None);
        assert_eq!(required_for("/heist.v1.AuthService/IssueToken"), None);
        assert_eq!(required_for("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn admin_grants_everything() {
        assert!(grants("admin", TOOLS_CALL));
        assert!(grants("tools:read tools:call", TOOLS_CALL));
        assert!(!grants("tools:read", TOOLS_CALL));
        assert!(!grants("", TOOLS_CALL));
    }
}
