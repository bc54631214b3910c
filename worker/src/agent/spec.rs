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
            &["calc"],
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
            &["calc"],
        ),
        crew(
            "lookout",
            "watches guard shifts, cameras and alarm zones.",
            &["db.query"],
        ),
    ]
}
