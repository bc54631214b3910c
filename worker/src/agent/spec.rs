//! Agent specs and the built-in set (a general assistant and the six heist roles), so agents
//! work with nothing configured.

use serde::{Deserialize, Serialize};

/// An agent: who it is, which model chain it runs on, what it may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Unique name, e.g. "intel".
    pub name: String,
    /// Its role in a sentence.
    pub role: String,
    /// The system prompt (a `[scripted]` section in it steers the scripted model).
    pub system_prompt: String,
    /// Model chain name (default "default").
    #[serde(default = "defaults::model")]
    pub model: String,
    /// Tools it may call (further narrowed by the turn's grant).
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// Most model calls in one turn (default 8).
    #[serde(default = "defaults::step_limit")]
    pub step_limit: u32,
    /// Sampling temperature (default 0.2).
    #[serde(default = "defaults::temperature")]
    pub temperature: f32,
    /// Most tokens one model call may produce (default 1024).
    #[serde(default = "defaults::max_output_tokens")]
    pub max_output_tokens: u32,
}

mod defaults {
    pub fn model() -> String {
        "default".to_owned()
    }
    pub fn step_limit() -> u32 {
        8
    }
    pub fn temperature() -> f32 {
        0.2
    }
    pub fn max_output_tokens() -> u32 {
        1024
    }
}

/// Why an agent spec was refused.
#[derive(Debug, thiserror::Error)]
#[error("agent {agent:?}: {message}")]
pub struct SpecError {
    /// The agent's name.
    pub agent: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Largest `step_limit` accepted.
pub const MAX_STEP_LIMIT: u32 = 100;

impl AgentSpec {
    /// Checks the fields a config file may get wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |message: String| {
            Err(SpecError {
                agent: self.name.clone(),
                message,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return fail(
                "the name must be non-empty ASCII letters, digits, '-', '_' or '.'".to_owned(),
            );
        }
        if self.step_limit == 0 || self.step_limit > MAX_STEP_LIMIT {
            return fail(format!(
                "step_limit is {}; use 1 to {MAX_STEP_LIMIT}",
                self.step_limit
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return fail(format!(
                "temperature is {}; use 0.0 to 2.0",
                self.temperature
            ));
        }
        if self.max_output_tokens == 0 {
            return fail("max_output_tokens must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// The built-in agents with `configured` ones added (a configured agent with a built-in name
/// replaces it), each validated, names unique, ordered by name.
pub fn agents_with(configured: Vec<AgentSpec>) -> Result<Vec<AgentSpec>, SpecError> {
    let mut all: std::collections::BTreeMap<String, AgentSpec> = builtin_agents()
        .into_iter()
        .map(|a| (a.name.clone(), a))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for spec in configured {
        spec.validate()?;
        if !seen.insert(spec.name.clone()) {
            return Err(SpecError {
                agent: spec.name,
                message: "is configured twice; give each agent its own name".to_owned(),
            });
        }
        all.insert(spec.name.clone(), spec);
    }
    Ok(all.into_values().collect())
}

fn agent(name: &str, role: &str, tools: &[&str]) -> AgentSpec {
    let tool_list = tools.join(", ");
    AgentSpec {
        name: name.to_owned(),
        role: role.to_owned(),
        system_prompt: format!(
            "You are the {name} of a crew. Your role: {role} Use your tools ({tool_list}) to \
             find facts in the session's files and databases, cite the facts you found in your \
             answer, and keep it short."
        ),
        model: defaults::model(),
        allowed_tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        step_limit: defaults::step_limit(),
        temperature: defaults::temperature(),
        max_output_tokens: defaults::max_output_tokens(),
    }
}

/// The agents every worker offers.
pub fn builtin_agents() -> Vec<AgentSpec> {
    const NOTES: [&str; 3] = ["memory.store", "memory.recall", "fs.write"];
    let crew = |name, role, tools: &[&str]| {
        let mut all: Vec<&str> = tools.to_vec();
        all.extend(NOTES);
        agent(name, role, &all)
    };
    vec![
        agent(
            "assistant",
            "a general helper that reads files and databases and computes.",
            &[
                "calc",
                "fs.read",
                "fs.list",
                "db.query",
                "memory.store",
                "memory.recall",
            ],
        ),
        crew(
            "planner",
            "turns the crew's findings into one plan and keeps the plan file.",
            &["calc", "fs.read"],
        ),
        crew(
            "hacker",
            "reads the blueprints for cameras, networks and entrances.",
            &["fs.read", "calc"],
        ),
        crew(
            "safecracker",
            "works out how to open the vault from its specs.",
            &["calc", "db.query"],
        ),
        crew(
            "intel",
            "finds guards, shifts and patrols in the security database and blueprints.",
            &["db.query", "fs.read"],
        ),
        crew(
            "driver",
            "plans the getaway: routes and timings.",
            &["calc", "db.query"],
        ),
        crew(
            "lookout",
            "watches guard shifts, cameras and alarm zones.",
            &["db.query"],
        ),
    ]
}
