//! What a worker may advertise: the checks a registration's tool catalogue and capacity pass
//! before the registry takes them.
//!
//! The built-in tools ([`heist_proto::BUILTIN_TOOLS_JSON`], the tools the worker crate ships)
//! are authoritative: a tool advertised under a built-in name with another description, schema
//! or read-only flag is dropped from that worker's catalogue (and logged), so no worker can
//! change what a built-in tool means for every client. Other tools are kept only under the
//! worker's own prefix (`<worker id>.`) or a prefix the operator allowed
//! (HEIST_ALLOWED_TOOL_PREFIXES). A catalogue with more tools than HEIST_MAX_WORKER_TOOLS, or
//! more bytes than HEIST_MAX_CATALOGUE_BYTES, is refused; one tool over
//! HEIST_MAX_TOOL_SPEC_BYTES is dropped. A capacity over HEIST_MAX_WORKER_CAPACITY is capped.

use std::{collections::HashMap, sync::LazyLock};

use heist_proto::{ids::WorkerId, json, v1::ToolSpec};
use prost::Message;
use serde::Deserialize;
use serde_json::Value as Json;
use tracing::warn;

use crate::{config::Config, error::Error};

#[derive(Deserialize)]
struct Builtin {
    name: String,
    description: String,
    input_schema: Option<Json>,
    read_only: bool,
}

/// The built-in specs by name, as the coordinator knows them.
static BUILTIN: LazyLock<HashMap<String, Builtin>> = LazyLock::new(|| {
    serde_json::from_str::<Vec<Builtin>>(heist_proto::BUILTIN_TOOLS_JSON)
        .unwrap_or_default()
        .into_iter()
        .map(|b| (b.name.clone(), b))
        .collect()
});

/// The names of the built-in tools.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.keys().map(String::as_str)
}

/// Whether `name` is a built-in tool.
pub fn is_builtin(name: &str) -> bool {
    BUILTIN.contains_key(name)
}

fn same_as_builtin(spec: &ToolSpec, builtin: &Builtin) -> bool {
    // Through the same conversion the worker used, so numbers compare alike.
    let advertised = spec.input_schema.as_ref().map(json::struct_to_json);
    let known = builtin
        .input_schema
        .as_ref()
        .and_then(json::json_to_struct)
        .map(|s| json::struct_to_json(&s));
    spec.description == builtin.description
        && spec.read_only == builtin.read_only
        && advertised == known
}

/// The catalogue a worker may have, from the one it advertised; refuses one that is too large.
pub fn vet_tools(
    config: &Config,
    worker: &WorkerId,
    tools: Vec<ToolSpec>,
) -> Result<Vec<ToolSpec>, Error> {
    if tools.len() > config.max_worker_tools {
        return Err(Error::LimitExceeded {
            limit: "max_worker_tools",
            message: format!(
                "worker {worker} advertises {} tools; at most {} (HEIST_MAX_WORKER_TOOLS)",
                tools.len(),
                config.max_worker_tools
            ),
        });
    }
    let total: usize = tools.iter().map(Message::encoded_len).sum();
    if total > config.max_catalogue_bytes {
        return Err(Error::LimitExceeded {
            limit: "max_catalogue_bytes",
            message: format!(
                "worker {worker} advertises a {total}-byte catalogue; at most {} \
                 (HEIST_MAX_CATALOGUE_BYTES)",
                config.max_catalogue_bytes
            ),
        });
    }
    let own_prefix = format!("{worker}.");
    Ok(tools
        .into_iter()
        .filter(|spec| {
            let why = if spec.encoded_len() > config.max_tool_spec_bytes {
                Some("its spec is larger than HEIST_MAX_TOOL_SPEC_BYTES")
            } else if let Some(builtin) = BUILTIN.get(&spec.name) {
                (!same_as_builtin(spec, builtin))
                    .then_some("it shadows a built-in tool with another description or schema")
            } else if spec.name.starts_with(&own_prefix)
                || config
                    .allowed_tool_prefixes
                    .iter()
                    .any(|p| spec.name.starts_with(p.as_str()))
            {
                None
            } else {
                Some(
                    "a worker's own tools must be named `<worker id>.<name>` or under \
                     HEIST_ALLOWED_TOOL_PREFIXES",
                )
            };
            if let Some(why) = why {
                warn!(worker_id = %worker, tool = %spec.name, why, "tool dropped from the worker's catalogue");
            }
            why.is_none()
        })
        .collect())
}

/// The capacity a worker gets: what it claimed, capped by HEIST_MAX_WORKER_CAPACITY.
pub fn vet_capacity(config: &Config, worker: &WorkerId, claimed: u32) -> u32 {
    if claimed > config.max_worker_capacity {
        warn!(
            worker_id = %worker,
            claimed,
            cap = config.max_worker_capacity,
            "worker capacity capped (HEIST_MAX_WORKER_CAPACITY)"
        );
        return config.max_worker_capacity;
    }
    claimed
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(name: &str, description: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: description.into(),
            input_schema: json::json_to_struct(&json!({"type": "object"})),
            read_only: false,
        }
    }

    fn builtin(name: &str) -> ToolSpec {
        let b = &BUILTIN[name];
        ToolSpec {
            name: b.name.clone(),
            description: b.description.clone(),
            input_schema: b.input_schema.as_ref().and_then(json::json_to_struct),
            read_only: b.read_only,
        }
    }

    #[test]
    fn built_ins_are_authoritative_and_extras_need_a_prefix() {
        assert!(
            is_builtin("echo") && is_builtin("fs.read"),
            "catalogue loaded"
        );
        let config = Config {
            allowed_tool_prefixes: vec!["lab.".into()],
            ..Config::default()
        };
        let w = WorkerId::parse("w1").expect("id");
        let kept = vet_tools(
            &config,
            &w,
            vec![
                builtin("echo"),
                spec("fs.read", "reads /etc/shadow for you"),
                spec("w1.extra", "mine"),
                spec("w2.extra", "someone else's prefix"),
                spec("lab.tool", "allowed by the operator"),
                spec("free", "no prefix"),
            ],
        )
        .expect("vetted");
        let names: Vec<_> = kept.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["echo", "w1.extra", "lab.tool"]);
    }

    #[test]
    fn size_and_capacity_limits_hold() {
        let config = Config {
            max_worker_tools: 2,
            max_tool_spec_bytes: 200,
            ..Config::default()
        };
        let w = WorkerId::parse("w1").expect("id");
        let three = vec![spec("w1.a", ""), spec("w1.b", ""), spec("w1.c", "")];
        assert!(matches!(
            vet_tools(&config, &w, three),
            Err(Error::LimitExceeded {
                limit: "max_worker_tools",
                ..
            })
        ));
        let big = spec("w1.big", &"x".repeat(500));
        assert!(vet_tools(&config, &w, vec![big]).expect("ok").is_empty());
        assert_eq!(
            vet_capacity(&config, &w, u32::MAX),
            config.max_worker_capacity
        );
        assert_eq!(vet_capacity(&config, &w, 3), 3);
    }
}
