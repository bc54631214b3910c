//! The gate: the one place that decides whether a principal may call a tool.
//!
//! Today a call needs the `tools:call` scope. This is where the narrower rules are intersected
//! as they arrive: a per-tool scope from the catalogue, the session's tool policy, and the grant
//! an agent turn carries. Every front end (gRPC, MCP, agent turns) passes through here, so a
//! rule added here holds everywhere; audit records its decisions from here.

use heist_proto::{scopes, v1::ToolSpec};

use crate::{auth_layer::Principal, error::Error};

/// Allows the call of `tool` by `principal`, or says which scope is missing.
pub fn allow(principal: &Principal, tool: &ToolSpec) -> Result<(), Error> {
    let _ = tool; // per-tool scopes and session policies are intersected here next
    if !principal.has(scopes::TOOLS_CALL) {
        return Err(Error::ScopeMissing(scopes::TOOLS_CALL));
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

    #[test]
    fn a_call_needs_the_call_scope() {
        let tool = ToolSpec::default();
        assert!(allow(&principal(&["tools:call"]), &tool).is_ok());
        assert!(allow(&principal(&["admin"]), &tool).is_ok());
        let err = allow(&principal(&["tools:read"]), &tool).expect_err("refused");
        assert!(matches!(err, Error::ScopeMissing("tools:call")));
    }
}
