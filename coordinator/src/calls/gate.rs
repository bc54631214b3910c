//! The gate: the one place that decides whether a principal may call a tool.
//!
//! A call is allowed when the token allows the tool (`admin`, `tools:call`, or the tool's
//! category scope: [`scopes::tool_scope`]) and the session's [`ToolPolicy`] does. Agent turns
//! get the same decision for every tool of the session's worker as their grant, which the worker
//! intersects with the agent's own tools. Every front end (gRPC, MCP, agent turns) passes
//! through here, so a rule added here holds everywhere; the pipeline audits the refusals.

use heist_proto::{ids::SessionId, scopes};

use super::policy::ToolPolicy;
use crate::{auth_layer::Principal, error::Error};

/// Allows `tool` by the token alone, or says which scope is missing.
pub fn token_allows(principal: &Principal, tool: &str) -> Result<(), Error> {
    let claim = principal.scopes.join(" ");
    scopes::may_call_tool(&claim, tool).map_err(|scope| Error::ToolScopeMissing {
        tool: tool.to_owned(),
        scope,
    })
}

/// Allows the call of `tool` by `principal` in `session` under its `policy`, or says what is
/// missing: the scope first, then the session's policy.
pub fn allow(
    principal: &Principal,
    session: &SessionId,
    policy: &ToolPolicy,
    tool: &str,
) -> Result<(), Error> {
    token_allows(principal, tool)?;
    if !policy.allows(tool) {
        return Err(Error::ToolNotAllowed {
            tool: tool.to_owned(),
            session: session.clone(),
            allowed: policy.describe(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal {
            id: "alice".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn session() -> SessionId {
        SessionId::parse("s-1").expect("id")
    }

    #[test]
    fn a_call_needs_the_tools_category_or_the_call_scope() {
        let open = ToolPolicy::default();
        let allow =
            |scopes: &[&str], tool: &str| allow(&principal(scopes), &session(), &open, tool);
        assert!(allow(&["tools:call"], "exec").is_ok());
        assert!(allow(&["admin"], "exec").is_ok());
        assert!(allow(&["tools:fs"], "fs.read").is_ok());
        let err = allow(&["tools:fs"], "exec").expect_err("refused");
        assert!(matches!(
            err,
            Error::ToolScopeMissing {
                scope: "tools:exec",
                ..
            }
        ));
        let err = allow(&["tools:read"], "echo").expect_err("refused");
        assert!(matches!(
            err,
            Error::ToolScopeMissing {
                scope: "tools:call",
                ..
            }
        ));
    }

    #[test]
    fn the_session_policy_narrows_even_admin() {
        let policy = ToolPolicy::stored(&["fs.*".to_owned()]);
        let admin = principal(&["admin"]);
        assert!(allow(&admin, &session(), &policy, "fs.write").is_ok());
        let err = allow(&admin, &session(), &policy, "calc").expect_err("refused");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("allows only fs.*"),
            "{}",
            status.message()
        );
        // The scope is named first when both are missing.
        let err = allow(&principal(&["tools:fs"]), &session(), &policy, "calc").expect_err("no");
        assert!(matches!(
            err,
            Error::ToolScopeMissing {
                scope: "tools:calc",
                ..
            }
        ));
    }
}
