//! `memory.store` / `memory.recall`: notes an agent keeps for its session, with optional tags,
//! found again by words. They live in the session's [`AgentState`](crate::agent::AgentState)
//! (so checkpoints carry them), not in the workspace files.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{Tool, ToolContext, ToolOutput, parse_args};
use crate::{
    Error,
    agent::{AgentStates, MemoryNote, lock},
};

/// Bounds on a session's memory.
#[derive(Clone, Copy, Debug)]
pub struct MemoryLimits {
    /// Longest note, in characters (default 4000).
    pub max_note_chars: usize,
    /// Most notes a session keeps (default 1000); storing more is refused.
    pub max_notes: usize,
    /// Most notes one recall returns (default 50).
    pub max_recall: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_note_chars: 4_000,
            max_notes: 1_000,
            max_recall: 50,
        }
    }
}

/// The memory tools over these agent states.
pub(crate) fn tools(states: &Arc<AgentStates>, limits: MemoryLimits) -> Vec<Box<dyn Tool>> {
    vec![
        Box::new(Store {
            states: Arc::clone(states),
            limits,
        }),
        Box::new(Recall {
            states: Arc::clone(states),
            limits,
        }),
    ]
}

struct Store {
    states: Arc<AgentStates>,
    limits: MemoryLimits,
}

#[derive(Deserialize)]
struct StoreArgs {
    text: String,
    #[serde(default)]
    tags: Vec<String>,
}

impl Tool for Store {
    fn name(&self) -> &'static str {
        "memory.store"
    }

    fn description(&self) -> &'static str {
        "Stores a note in the session's memory, with optional tags. Returns {id}. Notes survive \
         turns, checkpoints and restores; find them with memory.recall."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": self.limits.max_note_chars, "description": "The note."},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 16, "description": "Tags to filter by later."}
            },
            "required": ["text"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        // It changes the session's state (which checkpoints carry), so retries must not
        // store a note twice.
        false
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: StoreArgs = parse_args(args)?;
            let shared = self.states.get(ctx.workspace.id());
            let mut state = lock(&shared);
            let max = self.limits.max_notes;
            if state.memory.len() >= max {
                return Err(Error::LimitExceeded {
                    limit: "max_notes",
                    message: format!(
                        "the session already holds {max} notes, the most it keeps: \
                         start a new session or fork an earlier checkpoint"
                    ),
                });
            }
            let id = state.next_note_id;
            state.next_note_id += 1;
            state.memory.push(MemoryNote {
                id,
                text: args.text,
                tags: args.tags,
            });
            let mut out = Map::new();
            out.insert("id".to_owned(), json!(id));
            Ok(ToolOutput::object(out))
        })
    }
}

struct Recall {
    states: Arc<AgentStates>,
    limits: MemoryLimits,
}

#[derive(Deserialize)]
struct RecallArgs {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

impl Tool for Recall {
    fn name(&self) -> &'static str {
        "memory.recall"
    }

    fn description(&self) -> &'static str {
        "Finds notes in the session's memory: those sharing the most words with `query` (all \
         notes, newest first, without one), optionally only those tagged `tag`. Returns {notes: \
         [{id, text, tags}]}."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Words to look for."},
                "tag": {"type": "string", "description": "Only notes with this tag."},
                "limit": {"type": "integer", "minimum": 1, "maximum": self.limits.max_recall, "default": 10, "description": "Most notes returned."}
            },
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: RecallArgs = parse_args(args)?;
            let shared = self.states.get(ctx.workspace.id());
            let state = lock(&shared);
            let words = args.query.as_deref().map(words).unwrap_or_default();
            let mut hits: Vec<(usize, &MemoryNote)> = state
                .memory
                .iter()
                .filter(|n| args.tag.as_ref().is_none_or(|t| n.tags.contains(t)))
                .map(|n| {
                    let mut have = words_of(n);
                    have.sort_unstable();
                    let score = words
                        .iter()
                        .filter(|w| have.binary_search(w).is_ok())
                        .count();
                    (score, n)
                })
                .filter(|(score, _)| words.is_empty() || *score > 0)
                .collect();
            // Best match first; among equals, the newest.
            hits.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.id.cmp(&a.1.id)));
            let notes: Vec<Json> = hits
                .into_iter()
                .take(args.limit.unwrap_or(10).min(self.limits.max_recall))
                .map(|(_, n)| json!({"id": n.id, "text": n.text, "tags": n.tags}))
                .collect();
            let mut out = Map::new();
            out.insert("notes".to_owned(), Json::Array(notes));
            Ok(ToolOutput::object(out))
        })
    }
}

fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != ':')
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn words_of(note: &MemoryNote) -> Vec<String> {
    let mut all = words(&note.text);
    all.extend(note.tags.iter().map(|t| t.to_lowercase()));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::test_support::context;

    async fn call(tool: &dyn Tool, ctx: &ToolContext, args: Json) -> Json {
        let out = tool.call(ctx, args).await.expect("call");
        assert!(!out.is_error, "{out:?}");
        Json::Object(out.structured.expect("structured"))
    }

    #[tokio::test]
    async fn notes_are_found_by_words_and_tags_and_live_in_agent_state() {
        let (_tmp, ctx) = context();
        let states = Arc::new(AgentStates::new());
        let [store, recall]: [Box<dyn Tool>; 2] = tools(&states, MemoryLimits::default())
            .try_into()
            .ok()
            .expect("two");
        call(
            &*store,
            &ctx,
            json!({"text": "Vault guard Ada starts at 22:00", "tags": ["vault"]}),
        )
        .await;
        call(&*store, &ctx, json!({"text": "Van parked on Elm street"})).await;
        call(
            &*store,
            &ctx,
            json!({"text": "Lobby camera blind spot", "tags": ["camera"]}),
        )
        .await;

        let found = call(
            &*recall,
            &ctx,
            json!({"query": "when does the vault guard start?"}),
        )
        .await;
        assert_eq!(found["notes"][0]["text"], "Vault guard Ada starts at 22:00");
        assert_eq!(found["notes"].as_array().map(Vec::len), Some(1));

        let tagged = call(&*recall, &ctx, json!({"tag": "camera"})).await;
        assert_eq!(tagged["notes"][0]["id"], 3);

        let all = call(&*recall, &ctx, json!({})).await;
        assert_eq!(all["notes"].as_array().map(Vec::len), Some(3));
        assert_eq!(all["notes"][0]["id"], 3, "newest first");

        let state = states.get(ctx.workspace.id());
        assert_eq!(lock(&state).memory.len(), 3);
        assert!(
            std::fs::read_dir(ctx.workspace.path())
                .expect("ls")
                .next()
                .is_none(),
            "nothing was written to the workspace"
        );
    }
}
