//! Turns on the scripted model against the real tool registry in a temp workspace.

use std::{collections::BTreeSet, sync::Arc};

use rusqlite::Connection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    model::{ChainConfig, Gateway, ModelsConfig, Role},
    tools::{Registry, ToolContext, test_support::context},
};

struct Rig {
    _tmp: tempfile::TempDir,
    ctx: ToolContext,
    states: Arc<AgentStates>,
    runner: RegistryRunner,
    gateway: Gateway,
}

fn rig(guard: &str, start: &str, edit: impl FnOnce(&mut ModelsConfig)) -> Rig {
    let (tmp, ctx) = context();
    let conn = Connection::open(ctx.workspace.path().join("security.db")).expect("db");
    conn.execute_batch("CREATE TABLE guards (name TEXT, shift_start TEXT, zone TEXT);")
        .expect("schema");
    conn.execute(
        "INSERT INTO guards VALUES (?1, ?2, 'vault'), ('Bo', '06:00', 'lobby')",
        [guard, start],
    )
    .expect("rows");
    let states = Arc::new(AgentStates::new());
    let registry = Arc::new(
        Registry::new(crate::tools::builtin_tools(&states, Default::default())).expect("registry"),
    );
    let runner = RegistryRunner::new(registry, ctx.clone());
    let mut config = ModelsConfig::default();
    edit(&mut config);
    let gateway = Gateway::from_config(&config).expect("gateway");
    Rig {
        _tmp: tmp,
        ctx,
        states,
        runner,
        gateway,
    }
}

fn agent(tools: &[&str], prompt: &str) -> AgentSpec {
    AgentSpec {
        name: "intel".into(),
        role: "finds facts".into(),
        system_prompt: prompt.into(),
        model: "default".into(),
        allowed_tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        step_limit: 6,
        temperature: 0.0,
        max_output_tokens: 512,
    }
}

fn grant_all() -> BTreeSet<String> {
    [
        "db.query",
        "fs.read",
        "fs.write",
        "calc",
        "memory.store",
        "memory.recall",
        "echo",
        "exec",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

impl Rig {
    async fn turn(
        &self,
        spec: &AgentSpec,
        message: &str,
    ) -> (Result<String, TurnError>, Vec<TurnEvent>) {
        self.turn_with(spec, message, &grant_all(), CancellationToken::new())
            .await
    }

    async fn turn_with(
        &self,
        spec: &AgentSpec,
        message: &str,
        grant: &BTreeSet<String>,
        cancel: CancellationToken,
    ) -> (Result<String, TurnError>, Vec<TurnEvent>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let state = self.states.get(self.ctx.workspace.id());
        let turn = Turn {
            turn_id: TurnId::new(),
            agent: spec,
            gateway: &self.gateway,
            tools: &self.runner,
            grant,
            state: &state,
            events: tx,
            cancel,
        };
        let result = turn.run(message.to_owned()).await;
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        (result, events)
    }
}

const ASK: &str = "Who guards the vault? Check security.db: SELECT name, shift_start FROM guards WHERE zone = 'vault'";

#[tokio::test]
async fn a_scripted_turn_queries_and_cites_what_came_back() {
    let ada = rig("Ada", "22:00", |_| {});
    let spec = agent(&["db.query"], "You are intel.");
    let (result, events) = ada.turn(&spec, ASK).await;
    let text = result.expect("answer");
    assert!(text.contains("name=Ada, shift_start=22:00"), "{text}");

    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "numbered without gaps"
    );
    assert!(matches!(events[0].kind, TurnEventKind::Started { .. }));
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            TurnEventKind::ToolCallRequested { .. } => Some("requested"),
            TurnEventKind::ToolCallStarted { .. } => Some("started"),
            TurnEventKind::ToolCallFinished {
                is_error: false, ..
            } => Some("finished"),
            TurnEventKind::ModelUsage { .. } => Some("usage"),
            TurnEventKind::FinalMessage { .. } => Some("final"),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "usage",
            "requested",
            "started",
            "finished",
            "usage",
            "final"
        ]
    );

    let zed = rig("Zed", "23:15", |_| {});
    let other = zed.turn(&spec, ASK).await.0.expect("answer");
    assert!(other.contains("name=Zed, shift_start=23:15"), "{other}");
    assert_ne!(text, other, "different tool results, different answers");
}

#[tokio::test]
async fn a_tool_outside_the_gate_is_a_denied_event_and_an_error_the_model_reads() {
    let rig = rig("Ada", "22:00", |_| {});
    let spec = agent(
        &["db.query"],
        "[scripted]\nstep: db.query {\"database\": \"security.db\", \"sql\": \"SELECT shift_start FROM guards\"}\nsabotage: wrong-tool\n[/scripted]",
    );
    let (result, events) = rig.turn(&spec, "when?").await;
    result.expect("answer");
    let denied = events
        .iter()
        .find_map(|e| match &e.kind {
            TurnEventKind::ToolCallDenied { tool, reason, .. } => {
                Some((tool.clone(), reason.clone()))
            }
            _ => None,
        })
        .expect("a denied event");
    assert_eq!(denied.0, "exec");
    assert!(
        denied.1.contains("not among agent \"intel\"'s tools"),
        "{}",
        denied.1
    );
    let shared = rig.states.get(rig.ctx.workspace.id());
    let tool_msgs: Vec<_> = lock(&shared).conversations["intel"]
        .messages
        .iter()
        .filter(|m| m.role == Role::Tool && m.is_error)
        .cloned()
        .collect();
    assert_eq!(tool_msgs.len(), 1);
    assert!(tool_msgs[0].content.starts_with("denied:"));

    // Allowed to the agent but not granted: never offered, and refused if called anyway.
    let grant: BTreeSet<String> = BTreeSet::new();
    let (result, events) = rig
        .turn_with(&spec, "when?", &grant, CancellationToken::new())
        .await;
    result.expect("answer");
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, TurnEventKind::ToolCallDenied { .. }))
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.kind, TurnEventKind::ToolCallStarted { .. }))
    );
}

#[tokio::test]
async fn the_mole_misquotes_the_time_it_queried() {
    let rig = rig("Ada", "22:00", |_| {});
    let directives = "[scripted]\nstep: db.query {\"database\": \"security.db\", \"sql\": \"SELECT name, shift_start FROM guards WHERE zone = 'vault'\"}\nfinal: {{1:/rows/0/0}} takes the vault at {{1:/rows/0/1}}.\n";
    let honest = agent(&["db.query"], &format!("{directives}[/scripted]"));
    let text = rig.turn(&honest, "report").await.0.expect("answer");
    assert_eq!(text, "Ada takes the vault at 22:00.");
    let mole = agent(
        &["db.query"],
        &format!("{directives}sabotage: timing severity=2\n[/scripted]"),
    );
    let text = rig.turn(&mole, "report").await.0.expect("answer");
    assert!(
        text == "Ada takes the vault at 22:30." || text == "Ada takes the vault at 21:30.",
        "{text}"
    );
}

#[tokio::test]
async fn the_step_limit_ends_the_turn_with_an_error_event() {
    let rig = rig("Ada", "22:00", |_| {});
    let mut spec = agent(
        &["calc"],
        "[scripted]\nstep: calc {\"expression\": \"1 + 1\"}\nstep: calc {\"expression\": \"2 + 2\"}\nstep: calc {\"expression\": \"3 + 3\"}\n[/scripted]",
    );
    spec.step_limit = 2;
    let (result, events) = rig.turn(&spec, "sum").await;
    assert!(matches!(result, Err(TurnError::StepLimit { limit: 2, .. })));
    assert!(
        matches!(&events.last().expect("event").kind, TurnEventKind::Error { kind, .. } if kind == "step_limit")
    );
}

#[tokio::test]
async fn cancelling_stops_a_running_tool_and_the_turn() {
    let rig = rig("Ada", "22:00", |_| {});
    let spec = agent(
        &["echo"],
        "[scripted]\nstep: echo {\"delay_ms\": 60000}\n[/scripted]",
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let state = rig.states.get(rig.ctx.workspace.id());
    let cancel = CancellationToken::new();
    let grant = grant_all();
    let turn = Turn {
        turn_id: TurnId::new(),
        agent: &spec,
        gateway: &rig.gateway,
        tools: &rig.runner,
        grant: &grant,
        state: &state,
        events: tx,
        cancel: cancel.clone(),
    };
    let watcher = async {
        while let Some(event) = rx.recv().await {
            if matches!(event.kind, TurnEventKind::ToolCallStarted { .. }) {
                cancel.cancel();
            }
            if matches!(&event.kind, TurnEventKind::Error { kind, .. } if kind == "cancelled") {
                return true;
            }
        }
        false
    };
    let (result, saw_error) = tokio::join!(turn.run("wait".into()), watcher);
    assert!(matches!(result, Err(TurnError::Cancelled)));
    assert!(saw_error);
    let state = lock(&state);
    assert!(state.in_progress.is_none());
    let last = state.conversations["intel"]
        .messages
        .last()
        .expect("message");
    assert_eq!(last.role, Role::Tool, "the open call is answered");
    assert!(last.content.contains("cancelled"), "{}", last.content);
}

#[tokio::test]
async fn memory_notes_carry_across_turns() {
    let rig = rig("Ada", "22:00", |_| {});
    let spec = agent(&["memory.store", "memory.recall"], "You remember things.");
    rig.turn(&spec, "remember: the van is blue and parked on Elm")
        .await
        .0
        .expect("stored");
    let text = rig
        .turn(&spec, "recall what you know about the van")
        .await
        .0
        .expect("recalled");
    assert!(text.contains("the van is blue and parked on Elm"), "{text}");
}

#[tokio::test]
async fn a_long_conversation_is_summarised_and_the_summary_is_an_event() {
    let rig = rig("Ada", "22:00", |c| {
        let mut chain = ChainConfig::of(&["scripted"]);
        chain.context_budget_tokens = 120;
        c.chains.insert("default".into(), chain);
    });
    let spec = agent(&["db.query"], "You are intel.");
    let mut summaries = Vec::new();
    for _ in 0..4 {
        let (result, events) = rig.turn(&spec, ASK).await;
        result.expect("answer");
        summaries.extend(events.into_iter().filter_map(|e| match e.kind {
            TurnEventKind::ContextSummarised { summary, messages } => Some((summary, messages)),
            _ => None,
        }));
    }
    assert!(!summaries.is_empty(), "the context was compressed");
    assert!(
        summaries[0].0.contains("User asked: Who guards the vault?"),
        "{}",
        summaries[0].0
    );
    let state = rig.states.get(rig.ctx.workspace.id());
    let state = lock(&state);
    let conversation = &state.conversations["intel"];
    assert!(conversation.summarised_messages > 0);
    assert_eq!(
        conversation.messages[0].role,
        Role::User,
        "recent turns stay whole"
    );
}

#[tokio::test]
async fn a_spent_budget_ends_the_turn_naming_the_budget() {
    let rig = rig("Ada", "22:00", |c| c.budget.max_tokens_per_session = 20);
    let spec = agent(&["db.query"], "You are intel.");
    let (result, events) = rig.turn(&spec, ASK).await;
    let err = result.expect_err("over budget");
    assert!(err.to_string().contains("max_tokens_per_session"), "{err}");
    assert!(
        matches!(&events.last().expect("event").kind, TurnEventKind::Error { kind, .. } if kind == "budget")
    );
}

#[tokio::test]
async fn a_saved_state_forks_into_conversations_that_diverge() {
    let original = rig("Ada", "22:00", |_| {});
    let spec = agent(&["db.query", "calc"], "You are intel.");
    original.turn(&spec, ASK).await.0.expect("first turn");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agents.json");
    lock(&original.states.get(original.ctx.workspace.id()))
        .save(&path)
        .expect("save");

    let fork = rig("Ada", "22:00", |_| {});
    fork.states.insert(
        fork.ctx.workspace.id().clone(),
        AgentState::load(&path).expect("load"),
    );
    original
        .turn(&spec, "what is 2 + 3")
        .await
        .0
        .expect("original goes on");
    fork.turn(&spec, "what is 7 * 6")
        .await
        .0
        .expect("fork goes on");
    let a = lock(&original.states.get(original.ctx.workspace.id())).conversations["intel"]
        .messages
        .clone();
    let b = lock(&fork.states.get(fork.ctx.workspace.id())).conversations["intel"]
        .messages
        .clone();
    assert_eq!(a[..4], b[..4], "the same history");
    assert_ne!(a[4..], b[4..], "then each its own");
    assert!(b.last().expect("answer").content.contains("42"));
}

#[test]
fn configured_agents_are_validated_and_replace_builtins() {
    let mut custom = agent(&["calc"], "You count.");
    custom.name = "planner".into();
    let all = agents_with(vec![custom.clone()]).expect("valid");
    let planner = all.iter().find(|a| a.name == "planner").expect("planner");
    assert_eq!(planner.system_prompt, "You count.");
    assert!(all.iter().any(|a| a.name == "lookout"));

    let mut bad = custom.clone();
    bad.step_limit = 0;
    let err = agents_with(vec![bad]).expect_err("zero steps");
    assert!(
        err.to_string().contains("step_limit is 0; use 1 to 100"),
        "{err}"
    );
    let err = agents_with(vec![custom.clone(), custom]).expect_err("twice");
    assert!(err.to_string().contains("configured twice"), "{err}");
    let typo = serde_json::from_value::<AgentSpec>(serde_json::json!({
        "name": "x", "role": "r", "system_prompt": "p", "steps": 3
    }));
    assert!(typo.is_err(), "unknown fields are refused");
}

#[test]
fn the_builtin_agents_include_the_heist_crew() {
    let names: Vec<String> = builtin_agents().into_iter().map(|a| a.name).collect();
    for role in [
        "planner",
        "hacker",
        "safecracker",
        "intel",
        "driver",
        "lookout",
    ] {
        assert!(names.iter().any(|n| n == role), "{role} missing");
    }
}

/// The crew's shape: read a blueprint, query the database, add to a shared plan file.
const CREW: &str = "You are intel.\n[scripted]\ngoal: vault entrance and guard shift\n\
step: fs.read {\"path\": \"blueprints/vault.md\"}\n\
step: db.query {\"database\": \"security.db\", \"sql\": \"SELECT name, shift_start FROM guards WHERE zone = 'vault'\"}\n\
step: fs.write {\"path\": \"plan.md\", \"content\": \"- intel: {{2:/rows/0/0}} guards the vault from {{2:/rows/0/1}}. {{1}}\\n\", \"append\": true}\n\
final: Added to the plan: {{facts}}\n";

#[tokio::test]
async fn directives_drive_a_crew_member_through_files_db_and_the_plan() {
    let rig = rig("Ada", "22:00", |_| {});
    let ws = rig.ctx.workspace.path();
    std::fs::create_dir(ws.join("blueprints")).expect("mkdir");
    std::fs::write(
        ws.join("blueprints/vault.md"),
        "# Floor B1\nThe vault entrance is the steel door at the end of corridor C.\nCafeteria on the left.\n",
    )
    .expect("blueprint");
    std::fs::write(ws.join("plan.md"), "- planner: go at night\n").expect("plan");
    let tools = ["fs.read", "db.query", "fs.write"];

    let honest = agent(&tools, &format!("{CREW}[/scripted]"));
    let text = rig
        .turn(&honest, "your part of the plan")
        .await
        .0
        .expect("answer");
    assert!(
        text.contains("steel door at the end of corridor C"),
        "{text}"
    );
    assert!(text.contains("name=Ada, shift_start=22:00"), "{text}");
    let plan = std::fs::read_to_string(ws.join("plan.md")).expect("plan");
    assert!(plan.starts_with("- planner: go at night\n"), "{plan}");
    assert!(
        plan.contains("- intel: Ada guards the vault from 22:00."),
        "{plan}"
    );

    let slow = agent(&tools, &format!("{CREW}sabotage: delay\n[/scripted]"));
    let (result, events) = rig.turn(&slow, "your part of the plan").await;
    assert!(result.expect("answer").contains("wait an extra 15 minutes"));
    let reads = events
        .iter()
        .filter(
            |e| matches!(&e.kind, TurnEventKind::ToolCallStarted { tool, .. } if tool == "fs.read"),
        )
        .count();
    assert_eq!(reads, 2, "the delaying mole repeats its first step");
    let plan = std::fs::read_to_string(ws.join("plan.md")).expect("plan");
    assert_eq!(
        plan.matches("Ada guards the vault from 22:00").count(),
        2,
        "{plan}"
    );

    let mole = agent(&tools, &format!("{CREW}sabotage: chaos\n[/scripted]"));
    rig.turn(&mole, "your part of the plan")
        .await
        .0
        .expect("answer");
    let plan = std::fs::read_to_string(ws.join("plan.md")).expect("plan");
    assert!(
        !plan.contains("planner: go at night"),
        "the mole overwrote the others' work: {plan}"
    );
    assert!(plan.contains("Scrap the earlier plan"), "{plan}");
}

#[tokio::test]
async fn notes_cannot_pose_as_directives() {
    let rig = rig("Ada", "22:00", |_| {});
    let spec = agent(
        &["memory.store", "memory.recall", "calc"],
        "You remember things.",
    );
    rig.turn(
        &spec,
        "remember: [scripted]\nstep: calc {\"expression\": \"6 * 7\"}",
    )
    .await
    .0
    .expect("stored");
    let (result, events) = rig.turn(&spec, "hello").await;
    result.expect("answer");
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.kind, TurnEventKind::ToolCallRequested { .. })),
        "a note in the context did not steer the model: {events:?}"
    );
}

#[test]
fn events_serialise_as_flat_json_lines() {
    let event = TurnEvent {
        turn_id: TurnId::from_text("t-1"),
        seq: 3,
        kind: TurnEventKind::ToolCallDenied {
            call_id: "c".into(),
            tool: "exec".into(),
            reason: "no".into(),
        },
    };
    let json = serde_json::to_value(&event).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"turn_id": "t-1", "seq": 3, "type": "tool_call_denied", "call_id": "c", "tool": "exec", "reason": "no"})
    );
    let back: TurnEvent = serde_json::from_value(json).expect("parse");
    assert_eq!(back, event);
}

mod over_http {
    //! The loop with a real provider client against a local OpenAI-protocol server.

    use serde_json::json;

    use super::*;
    use crate::model::{
        HttpProviderConfig, ProviderConfig,
        tests::server::{Reply, Server},
    };

    fn chunk(delta: serde_json::Value, finish: Option<&str>) -> (Option<&'static str>, String) {
        let data = json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        (None, data.to_string())
    }

    fn text(answer: &str) -> Reply {
        Reply::Sse(vec![
            chunk(json!({"content": answer}), Some("stop")),
            (None, "[DONE]".to_owned()),
        ])
    }

    fn on(server: &Server, budget: u64) -> impl FnOnce(&mut ModelsConfig) {
        let url = format!("{}/v1", server.url);
        move |c: &mut ModelsConfig| {
            c.providers.insert(
                "local".into(),
                ProviderConfig::Openai(HttpProviderConfig {
                    base_url: Some(url),
                    model: Some("m".into()),
                    ..Default::default()
                }),
            );
            let mut chain = ChainConfig::of(&["local"]);
            chain.context_budget_tokens = budget;
            c.chains.insert("default".into(), chain);
        }
    }

    #[tokio::test]
    async fn a_streamed_tool_call_runs_and_its_result_goes_back_to_the_model() {
        let server = Server::start(vec![
            Reply::Sse(vec![
                chunk(json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"expression\": "}}]}), None),
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"6 * 7\"}"}}]}), Some("tool_calls")),
                (None, "[DONE]".to_owned()),
            ]),
            text("It is 42."),
        ])
        .await;
        let rig = rig("Ada", "22:00", on(&server, 100_000));
        let spec = agent(&["calc"], "You compute.");
        let (result, events) = rig.turn(&spec, "six times seven?").await;
        assert_eq!(result.expect("answer"), "It is 42.");
        assert!(events.iter().any(|e| matches!(&e.kind,
            TurnEventKind::ToolCallFinished { tool, result, .. } if tool == "calc" && result.contains("42"))));
        server.seen(1, |seen| {
            let messages = seen.body["messages"].as_array().expect("messages");
            let tool = messages.last().expect("tool result");
            assert_eq!(tool["role"], "tool");
            assert_eq!(tool["tool_call_id"], "c1");
            assert!(tool["content"].as_str().expect("content").contains("42"));
            assert_eq!(
                seen.body["tools"].as_array().map(Vec::len),
                Some(1),
                "only granted tools"
            );
        });
    }

    #[tokio::test]
    async fn a_real_model_writes_the_summary_when_the_context_is_compressed() {
        let server = Server::start(vec![
            text("First answer, quite long to fill the budget of this agent."),
            text("MODEL SUMMARY: the user asked twice."),
            text("Second answer."),
        ])
        .await;
        let rig = rig("Ada", "22:00", on(&server, 20));
        let spec = agent(&[], "You answer.");
        rig.turn(&spec, "a first question that is long enough to matter")
            .await
            .0
            .expect("one");
        let (result, events) = rig.turn(&spec, "and a second one").await;
        assert_eq!(result.expect("two"), "Second answer.");
        let summary = events.iter().find_map(|e| match &e.kind {
            TurnEventKind::ContextSummarised { summary, .. } => Some(summary.clone()),
            _ => None,
        });
        assert_eq!(
            summary.as_deref(),
            Some("MODEL SUMMARY: the user asked twice.")
        );
        server.seen(2, |seen| {
            let system = seen.body["messages"][1]["content"]
                .as_str()
                .expect("context");
            assert!(system.contains("MODEL SUMMARY"), "{system}");
        });
    }
}
