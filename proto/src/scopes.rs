//! Scope names carried in the token's `scope` claim, the scope each public RPC requires, and
//! the allow-list of the paths served without a token.
//!
//! Access fails closed: a path is public only when [`PUBLIC`] lists it; every other path needs
//! a valid token, and a path no table knows needs [`ADMIN`].
//!
//! Tool calls have category scopes too ([`tool_scope`]): a call of a tool needs [`TOOLS_CALL`]
//! (every tool, what tokens held before the categories existed) or the tool's category scope
//! ([`TOOLS_FS`], ...); a tool in no category needs [`TOOLS_CALL`]. Scopes only add: holding
//! more never allows less.

/// Read workers (ClusterService).
pub const CLUSTER_READ: &str = "cluster:read";
/// Read the caller's sessions.
pub const SESSIONS_READ: &str = "sessions:read";
/// Create and close sessions.
pub const SESSIONS_WRITE: &str = "sessions:write";
/// List tools.
pub const TOOLS_READ: &str = "tools:read";
/// Call every tool (every category below, and the tools in none).
pub const TOOLS_CALL: &str = "tools:call";
/// Call the workspace file tools (`fs.read`, `fs.write`, `fs.list`, `fs.stat`, `fs.delete`).
pub const TOOLS_FS: &str = "tools:fs";
/// Run commands and code in the sandbox (`exec`, `run.python`).
pub const TOOLS_EXEC: &str = "tools:exec";
/// Call the calculator (`calc`).
pub const TOOLS_CALC: &str = "tools:calc";
/// Query the session's SQL database (`db.query`).
pub const TOOLS_QUERY: &str = "tools:query";
/// Store and recall agent memory (`memory.store`, `memory.recall`).
pub const TOOLS_MEMORY: &str = "tools:memory";
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
    TOOLS_FS,
    TOOLS_EXEC,
    TOOLS_CALC,
    TOOLS_QUERY,
    TOOLS_MEMORY,
    CHECKPOINTS_READ,
    CHECKPOINTS_WRITE,
    AGENTS_RUN,
    HEIST_PLAY,
    AUDIT_READ,
    ADMIN,
];

/// The tool category scopes: each grants the calls of the tools [`tool_scope`] maps to it.
pub const TOOL_CATEGORIES: &[&str] = &[TOOLS_FS, TOOLS_EXEC, TOOLS_CALC, TOOLS_QUERY, TOOLS_MEMORY];

/// Any of these lets a token through to CallTool and CallToolStream; which tool it may call
/// is decided per tool afterwards (the coordinator's gate).
pub const TOOL_CALL_SCOPES: &[&str] = &[
    TOOLS_CALL,
    TOOLS_FS,
    TOOLS_EXEC,
    TOOLS_CALC,
    TOOLS_QUERY,
    TOOLS_MEMORY,
];

/// The category scope of a built-in tool, by its exact name; `None` for a tool in no category
/// (`echo`, and every tool a worker adds under its own prefix), which only [`TOOLS_CALL`]
/// allows. Exact names, not prefixes: a worker whose id is `fs` cannot put its own `fs.x`
/// tools into the `tools:fs` category.
pub fn tool_scope(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "fs.read" | "fs.write" | "fs.list" | "fs.stat" | "fs.delete" => TOOLS_FS,
        "exec" | "run.python" => TOOLS_EXEC,
        "calc" => TOOLS_CALC,
        "db.query" => TOOLS_QUERY,
        "memory.store" | "memory.recall" => TOOLS_MEMORY,
        _ => return None,
    })
}

/// Whether a token with the space-separated `scope_claim` may call `tool`: with `admin`,
/// [`TOOLS_CALL`], or the tool's category scope. On refusal, the scope that would allow it
/// (the category's, or [`TOOLS_CALL`] for a tool in no category).
pub fn may_call_tool(scope_claim: &str, tool: &str) -> Result<(), &'static str> {
    let needed = tool_scope(tool).unwrap_or(TOOLS_CALL);
    if grants(scope_claim, needed) {
        Ok(())
    } else {
        Err(needed)
    }
}

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
    /// A valid token carrying any of these scopes (tool calls: [`TOOL_CALL_SCOPES`]; the tool
    /// itself is checked after).
    AnyScope(&'static [&'static str]),
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
    if matches!(
        path,
        "/heist.v1.ToolService/CallTool" | "/heist.v1.ToolService/CallToolStream"
    ) {
        return Access::AnyScope(TOOL_CALL_SCOPES);
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

/// Whether a space-separated `scope` claim grants `needed` (`admin` grants everything,
/// [`TOOLS_CALL`] every tool category).
pub fn grants(scope_claim: &str, needed: &str) -> bool {
    scope_claim.split_ascii_whitespace().any(|s| {
        s == needed || s == ADMIN || (s == TOOLS_CALL && TOOL_CATEGORIES.contains(&needed))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_rpcs_to_scopes() {
        let cases = [
            ("/heist.v1.SessionService/CreateSession", SESSIONS_WRITE),
            ("/heist.v1.SessionService/ListSessions", SESSIONS_READ),
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
        assert_eq!(
            access("/heist.v1.ToolService/CallTool"),
            Access::AnyScope(TOOL_CALL_SCOPES)
        );
        assert_eq!(
            access("/heist.v1.ToolService/CallToolStream"),
            Access::AnyScope(TOOL_CALL_SCOPES)
        );
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
        assert!(grants("admin", TOOLS_FS));
    }

    #[test]
    fn every_builtin_tool_but_echo_has_a_category() {
        #[derive(serde::Deserialize)]
        struct Named {
            name: String,
        }
        let builtins: Vec<Named> =
            serde_json::from_str(crate::BUILTIN_TOOLS_JSON).expect("built-in tools");
        assert!(builtins.len() > 5);
        for tool in builtins {
            let scope = tool_scope(&tool.name);
            if tool.name == "echo" {
                assert_eq!(scope, None);
            } else {
                let scope = scope.unwrap_or_else(|| panic!("{} has no category", tool.name));
                assert!(TOOL_CATEGORIES.contains(&scope), "{}", tool.name);
            }
        }
    }

    #[test]
    fn a_tool_needs_its_category_or_the_call_scope() {
        assert_eq!(tool_scope("fs.read"), Some(TOOLS_FS));
        assert_eq!(tool_scope("run.python"), Some(TOOLS_EXEC));
        assert_eq!(tool_scope("db.query"), Some(TOOLS_QUERY));
        assert_eq!(tool_scope("memory.recall"), Some(TOOLS_MEMORY));
        // Prefixes do not make a category: a worker called `fs` adds no fs tool.
        assert_eq!(tool_scope("fs.evil"), None);
        assert_eq!(tool_scope("w1.hello"), None);

        assert_eq!(may_call_tool("tools:fs", "fs.write"), Ok(()));
        assert_eq!(may_call_tool("tools:fs", "exec"), Err(TOOLS_EXEC));
        assert_eq!(may_call_tool("tools:fs", "echo"), Err(TOOLS_CALL));
        assert_eq!(may_call_tool("tools:fs", "w1.hello"), Err(TOOLS_CALL));
        assert_eq!(may_call_tool("tools:call", "exec"), Ok(()));
        assert_eq!(may_call_tool("tools:call", "w1.hello"), Ok(()));
        assert_eq!(may_call_tool("admin", "calc"), Ok(()));
        assert_eq!(may_call_tool("tools:read", "calc"), Err(TOOLS_CALC));
        // The call scope covers every category, for down-scoping at IssueToken too.
        assert!(grants("tools:call", TOOLS_MEMORY));
        assert!(!grants("tools:fs", TOOLS_CALL));
        assert!(!grants("tools:fs", TOOLS_EXEC));
    }
}
