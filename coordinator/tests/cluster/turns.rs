//! Agent turns through the coordinator on the scripted model: streamed numbered events,
//! transcripts, re-attaching after a dropped stream, request-id retries, cancellation of a
//! running command, the gate, other principals, and agent state in checkpoints.

use std::time::Duration;

use heist_proto::{
    errors::reason,
    token::TokenSigner,
    v1::{
        self, agent_service_client::AgentServiceClient,
        checkpoint_service_client::CheckpointServiceClient, turn_event::Event,
    },
};
use serde_json::json;
use tonic::{Code, Streaming, transport::Channel};

use crate::harness::*;

/// Marks the command the `sleeper` agent runs, so the test can find its process.
const SLEEP_MARK: &str = "heist-turn-cancel-mark";

fn agent(name: &str, tools: &[&str], directives: &str) -> heist_worker::agent::AgentSpec {
    heist_worker::agent::AgentSpec {
        name: name.to_owned(),
        role: format!("test agent {name}"),
        system_prompt: format!("You are {name}.\n[scripted]\n{directives}\n[/scripted]"),
        model: "default".to_owned(),
        allowed_tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        step_limit: 8,
        temperature: 0.2,
        max_output_tokens: 256,
    }
}

/// The test agents: `sleeper` runs a long command; `mole` reaches for exec, which it lacks.
fn test_agents(config: &mut heist_worker::Config) {
    config.agents = vec![
        agent(
            "sleeper",
            &["exec"],
            &format!("step: exec {{\"command\": \"sleep 30; : {SLEEP_MARK}\"}}\nfinal: slept"),
        ),
        agent(
            "mole",
            &["calc"],
            "step: calc {\"expression\": \"6 * 7\"}\nsabotage: wrong-tool severity=1\nfinal: the answer is {{facts}}",
        ),
    ];
}

struct Lab {
    dir: crate::harness::Scratch,
    coord: Coordinator,
    workers: Vec<Worker>,
    client: Client,
    agents: AgentServiceClient<Channel>,
}

async fn lab(ids: &[&str]) -> Lab {
    let dir = crate::harness::tempdir();
    let coord = Coordinator::start(coordinator_config(&dir.path().join("c"))).await;
    let mut workers = Vec::new();
    for id in ids {
        workers.push(
            Worker::start(
                &coord.url(),
                dir.path(),
                WorkerOpts::new(id).label("node", id).configure(test_agents),
            )
            .await,
        );
    }
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(ids).await;
    for w in &workers {
        let url = w.url();
        wait_for("the worker's health SERVING", || {
            let url = url.clone();
            async move { health_serving(&url).await.then_some(()) }
        })
        .await;
    }
    let agents = AgentServiceClient::new(channel(&coord.url()).await);
    Lab {
        dir,
        coord,
        workers,
        client,
        agents,
    }
}

impl Lab {
    async fn run(
        &mut self,
        session: &str,
        agent: &str,
        message: &str,
        request_id: &str,
    ) -> Result<Streaming<v1::TurnEvent>, tonic::Status> {
        let req = v1::RunTurnRequest {
            session_id: session.into(),
            agent: agent.into(),
            message: message.into(),
            request_id: request_id.into(),
        };
        self.agents
            .run_turn(authed(&self.client.token, req))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn watch(
        &mut self,
        turn: &str,
        from_seq: u64,
    ) -> Result<Streaming<v1::TurnEvent>, tonic::Status> {
        let req = v1::WatchTurnRequest {
            turn_id: turn.into(),
            from_seq,
        };
        self.agents
            .watch_turn(authed(&self.client.token, req))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn transcript(&mut self, session: &str) -> Vec<v1::TurnEvent> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = v1::GetTranscriptRequest {
                session_id: session.into(),
                page_size: 7,
                page_token,
            };
            let page = self
                .agents
                .get_transcript(authed(&self.client.token, req))
                .await
                .expect("transcript")
                .into_inner();
            all.extend(page.events);
            if page.next_page_token.is_empty() {
                return all;
            }
            page_token = page.next_page_token;
        }
    }

    async fn stop(self) {
        for w in self.workers {
            w.stop().await;
        }
        self.coord.stop().await;
        drop(self.dir);
    }
}

/// Every event until the stream ends.
async fn collect(mut events: Streaming<v1::TurnEvent>) -> Vec<v1::TurnEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(event) = tokio::time::timeout_at(deadline, events.message())
        .await
        .expect("the turn ends in time")
        .expect("event")
    {
        out.push(event);
    }
    out
}

/// Events until (and including) the first that `stop` accepts.
async fn until(
    events: &mut Streaming<v1::TurnEvent>,
    stop: impl Fn(&v1::TurnEvent) -> bool,
) -> Vec<v1::TurnEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let event = tokio::time::timeout_at(deadline, events.message())
            .await
            .expect("the event comes in time")
            .expect("event")
            .expect("the stream goes on");
        let done = stop(&event);
        out.push(event);
        if done {
            return out;
        }
    }
}

fn seqs(events: &[v1::TurnEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn finished(events: &[v1::TurnEvent]) -> Option<v1::TurnState> {
    match events.last()?.event {
        Some(Event::Finished(state)) => v1::TurnState::try_from(state).ok(),
        _ => None,
    }
}

fn tools_finished(events: &[v1::TurnEvent]) -> Vec<(String, bool, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::ToolCallFinished(call)) => {
                let result = call.result.clone().unwrap_or_default();
                Some((call.tool.clone(), result.is_error, text_of(&result)))
            }
            _ => None,
        })
        .collect()
}

fn final_message(events: &[v1::TurnEvent]) -> Option<String> {
    events.iter().find_map(|e| match &e.event {
        Some(Event::FinalMessage(text)) => Some(text.clone()),
        _ => None,
    })
}

const ASK: &str = "Read ledger.txt and compute 17 * 3";

async fn session_with_ledger(lab: &mut Lab) -> String {
    let s = lab.client.create_session(&[]).await.expect("session").id;
    lab.client
        .call(
            &s,
            "fs.write",
            json!({"path": "ledger.txt", "content": "vault code 4711\n"}),
        )
        .await
        .expect("write");
    s
}

#[tokio::test]
async fn a_scripted_turn_streams_numbered_events_and_lands_in_the_transcript() {
    let mut lab = lab(&["w1"]).await;
    let s = session_with_ledger(&mut lab).await;

    let agents = lab
        .agents
        .list_agents(authed(&lab.client.token, v1::ListAgentsRequest::default()))
        .await
        .expect("agents")
        .into_inner()
        .agents;
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    assert!(
        names.contains(&"assistant") && names.contains(&"sleeper"),
        "{names:?}"
    );

    let events = collect(lab.run(&s, "assistant", ASK, "").await.expect("run")).await;
    let n = events.len() as u64;
    assert_eq!(
        seqs(&events),
        (1..=n).collect::<Vec<_>>(),
        "numbered from 1 without gaps"
    );
    let turn = events[0].turn_id.clone();
    assert!(turn.starts_with("t-"), "{turn}");
    assert!(
        events
            .iter()
            .all(|e| e.turn_id == turn && e.agent == "assistant")
    );
    assert_eq!(events[0].event, Some(Event::Started(ASK.to_owned())));
    let tools = tools_finished(&events);
    assert_eq!(tools.len(), 2, "{tools:?}");
    assert_eq!((tools[0].0.as_str(), tools[0].1), ("fs.read", false));
    assert!(tools[0].2.contains("4711"), "{tools:?}");
    assert_eq!((tools[1].0.as_str(), tools[1].1), ("calc", false));
    assert!(tools[1].2.contains("51"), "{tools:?}");
    assert!(
        final_message(&events).is_some_and(|m| m.contains("51")),
        "{events:?}"
    );
    assert_eq!(finished(&events), Some(v1::TurnState::Completed));

    assert_eq!(
        lab.transcript(&s).await,
        events,
        "the transcript holds every event once"
    );
    let summary = lab
        .agents
        .get_turn(authed(
            &lab.client.token,
            v1::GetTurnRequest {
                turn_id: turn.clone(),
            },
        ))
        .await
        .expect("get turn")
        .into_inner();
    assert_eq!(summary.state, v1::TurnState::Completed as i32);
    assert_eq!(summary.last_seq, n);
    lab.stop().await;
}

#[tokio::test]
async fn a_dropped_stream_reattaches_from_any_event_exactly_once() {
    let mut lab = lab(&["w1"]).await;
    let s = session_with_ledger(&mut lab).await;
    let mut stream = lab.run(&s, "assistant", ASK, "").await.expect("run");
    let first = until(&mut stream, |e| e.seq == 2).await;
    drop(stream);
    let turn = first[0].turn_id.clone();
    let rest = collect(lab.watch(&turn, 3).await.expect("watch")).await;
    let mut all = first.clone();
    all.extend(rest);
    let n = all.len() as u64;
    assert_eq!(
        seqs(&all),
        (1..=n).collect::<Vec<_>>(),
        "every event exactly once"
    );
    assert_eq!(
        finished(&all),
        Some(v1::TurnState::Completed),
        "closing the stream did not cancel"
    );
    assert_eq!(lab.transcript(&s).await, all);
    // A later re-attach replays from anywhere.
    let tail = collect(lab.watch(&turn, n - 1).await.expect("watch")).await;
    assert_eq!(seqs(&tail), [n - 1, n]);
    lab.stop().await;
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_attaches_to_the_same_turn() {
    let mut lab = lab(&["w1"]).await;
    let s = session_with_ledger(&mut lab).await;
    let first = collect(lab.run(&s, "assistant", ASK, "turn-r1").await.expect("run")).await;
    let again = collect(
        lab.run(&s, "assistant", ASK, "turn-r1")
            .await
            .expect("retry"),
    )
    .await;
    assert_eq!(first, again, "the retry replays the same turn");
    let started = lab
        .transcript(&s)
        .await
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Started(_))))
        .count();
    assert_eq!(started, 1, "one turn ran");
    let err = lab
        .run(&s, "assistant", "something else", "turn-r1")
        .await
        .expect_err("another request under the same id");
    assert_status(&err, Code::InvalidArgument, reason::REQUEST_ID_REUSED);
    lab.stop().await;
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .count()
}

#[tokio::test]
async fn cancel_stops_a_turn_and_the_command_it_runs() {
    let mut lab = lab(&["w1"]).await;
    let s = lab.client.create_session(&[]).await.expect("session").id;
    let mut stream = lab.run(&s, "sleeper", "take a nap", "").await.expect("run");
    let seen = until(&mut stream, |e| {
        matches!(e.event, Some(Event::ToolCallStarted(_)))
    })
    .await;
    let turn = seen[0].turn_id.clone();
    wait_for("the command runs", || async {
        (processes_with(SLEEP_MARK) > 0).then_some(())
    })
    .await;

    // One turn at a time per session.
    let err = lab.run(&s, "assistant", ASK, "").await.expect_err("busy");
    assert_status(&err, Code::FailedPrecondition, reason::TURN_IN_PROGRESS);

    let started = tokio::time::Instant::now();
    lab.agents
        .cancel_turn(authed(
            &lab.client.token,
            v1::CancelTurnRequest {
                turn_id: turn.clone(),
            },
        ))
        .await
        .expect("cancel");
    let rest = collect(stream).await;
    assert_eq!(finished(&rest), Some(v1::TurnState::Cancelled));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancelled within the bound"
    );
    wait_for("the command is gone", || async {
        (processes_with(SLEEP_MARK) == 0).then_some(())
    })
    .await;
    // The session takes the next turn.
    let mut next = lab.run(&s, "sleeper", "again?", "").await.expect("run");
    let seen = until(&mut next, |e| {
        matches!(e.event, Some(Event::ToolCallStarted(_)))
    })
    .await;
    let req = v1::CancelTurnRequest {
        turn_id: seen[0].turn_id.clone(),
    };
    lab.agents
        .cancel_turn(authed(&lab.client.token, req))
        .await
        .expect("cancel");
    assert_eq!(
        finished(&collect(next).await),
        Some(v1::TurnState::Cancelled)
    );
    lab.stop().await;
}

#[tokio::test]
async fn a_denied_tool_is_an_event_and_the_turn_completes() {
    let mut lab = lab(&["w1"]).await;
    let s = lab.client.create_session(&[]).await.expect("session").id;
    let events = collect(
        lab.run(&s, "mole", "what is six times seven?", "")
            .await
            .expect("run"),
    )
    .await;
    let tools = tools_finished(&events);
    let denied: Vec<_> = tools.iter().filter(|t| t.0 == "exec").collect();
    assert_eq!(denied.len(), 1, "{tools:?}");
    assert!(denied[0].1 && denied[0].2.contains("denied"), "{denied:?}");
    assert!(tools.iter().any(|t| t.0 == "calc" && !t.1), "{tools:?}");
    assert_eq!(finished(&events), Some(v1::TurnState::Completed));
    lab.stop().await;
}

#[tokio::test]
async fn a_session_policy_narrows_what_an_agent_may_call() {
    let mut lab = lab(&["w1"]).await;
    let ran_calc =
        |events: &[v1::TurnEvent]| tools_finished(events).iter().any(|t| t.0 == "calc" && !t.1);
    // The agent has calc and the admin token allows it: in an open session it runs...
    let open = lab.client.create_session(&[]).await.expect("session").id;
    let events = collect(
        lab.run(&open, "mole", "six times seven?", "")
            .await
            .expect("run"),
    )
    .await;
    assert!(ran_calc(&events), "{:?}", tools_finished(&events));
    // ... but a session allowing only fs.* keeps it out of the turn's grant.
    let narrow = lab
        .client
        .create_session_allowing(&[], &["fs.*"])
        .await
        .expect("session")
        .id;
    let events = collect(
        lab.run(&narrow, "mole", "six times seven?", "")
            .await
            .expect("run"),
    )
    .await;
    assert!(!ran_calc(&events), "{:?}", tools_finished(&events));
    assert_eq!(finished(&events), Some(v1::TurnState::Completed));
    lab.stop().await;
}

#[tokio::test]
async fn another_principal_cannot_watch_cancel_or_read_a_turn() {
    let mut lab = lab(&["w1"]).await;
    let s = session_with_ledger(&mut lab).await;
    let events = collect(lab.run(&s, "assistant", ASK, "").await.expect("run")).await;
    let turn = events[0].turn_id.clone();

    let seed = std::fs::read(lab.dir.path().join("c").join("signing.key")).expect("key");
    let seed: [u8; 32] = seed.as_slice().try_into().expect("seed");
    let signer = TokenSigner::from_seed(&seed).expect("signer");
    let claims = TokenSigner::claims(
        "heist",
        "heist",
        "mallory",
        "sessions:read agents:run",
        Duration::from_secs(60),
    );
    let token = signer.sign(&claims).expect("token");
    let mut other = lab.agents.clone();
    let err = other
        .watch_turn(authed(
            &token,
            v1::WatchTurnRequest {
                turn_id: turn.clone(),
                from_seq: 1,
            },
        ))
        .await
        .expect_err("watch");
    assert_status(&err, Code::NotFound, reason::TURN_NOT_FOUND);
    let err = other
        .cancel_turn(authed(
            &token,
            v1::CancelTurnRequest {
                turn_id: turn.clone(),
            },
        ))
        .await
        .expect_err("cancel");
    assert_status(&err, Code::NotFound, reason::TURN_NOT_FOUND);
    let err = other
        .get_turn(authed(
            &token,
            v1::GetTurnRequest {
                turn_id: turn.clone(),
            },
        ))
        .await
        .expect_err("get");
    assert_status(&err, Code::NotFound, reason::TURN_NOT_FOUND);
    let err = other
        .get_transcript(authed(
            &token,
            v1::GetTranscriptRequest {
                session_id: s.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("transcript");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    let err = other
        .run_turn(authed(
            &token,
            v1::RunTurnRequest {
                session_id: s.clone(),
                agent: "assistant".into(),
                message: "hi".into(),
                request_id: String::new(),
            },
        ))
        .await
        .expect_err("run in another's session");
    assert_status(&err, Code::NotFound, reason::SESSION_NOT_FOUND);
    lab.stop().await;
}

/// The text of every memory.recall result of a turn.
fn recalled(events: &[v1::TurnEvent]) -> String {
    tools_finished(events)
        .into_iter()
        .filter(|t| t.0 == "memory.recall")
        .map(|t| t.2)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_forked_conversation_continues_on_the_other_worker_and_diverges() {
    let mut lab = lab(&["w1", "w2"]).await;
    let a = lab
        .client
        .create_session(&[("node", "w1")])
        .await
        .expect("session")
        .id;
    let first = collect(
        lab.run(&a, "assistant", "remember the vault code is 4711", "")
            .await
            .expect("run"),
    )
    .await;
    assert_eq!(finished(&first), Some(v1::TurnState::Completed));
    assert!(
        tools_finished(&first)
            .iter()
            .any(|t| t.0 == "memory.store" && !t.1)
    );

    let mut checkpoints = CheckpointServiceClient::new(channel(&lab.coord.url()).await);
    let cp = checkpoints
        .create_checkpoint(authed(
            &lab.client.token,
            v1::CreateCheckpointRequest {
                session_id: a.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("checkpoint")
        .into_inner();
    let manifest = checkpoints
        .get_checkpoint(authed(
            &lab.client.token,
            v1::GetCheckpointRequest {
                checkpoint_id: cp.id.clone(),
                include_manifest: true,
            },
        ))
        .await
        .expect("get checkpoint")
        .into_inner()
        .manifest
        .expect("manifest");
    assert_eq!(
        manifest.agent_state_hash.len(),
        32,
        "the checkpoint holds the agent state"
    );
    let b = checkpoints
        .fork_session(authed(
            &lab.client.token,
            v1::ForkSessionRequest {
                checkpoint_id: cp.id.clone(),
                labels: [("node".to_owned(), "w2".to_owned())].into(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("fork")
        .into_inner();
    assert_eq!(b.worker_id, "w2", "forked onto the other worker");
    let b = b.id;

    // The forked conversation is on w2, with the shared history.
    let saved = std::fs::read_to_string(
        lab.dir
            .path()
            .join("w2.agent-state")
            .join(format!("{b}.json")),
    )
    .expect("agent state file on w2");
    assert!(saved.contains("remember the vault code is 4711"), "{saved}");

    for (session, guard) in [(&a, "Bob"), (&b, "Alice")] {
        let events = collect(
            lab.run(
                session,
                "assistant",
                &format!("remember the guard is {guard}"),
                "",
            )
            .await
            .expect("run"),
        )
        .await;
        assert_eq!(finished(&events), Some(v1::TurnState::Completed));
    }
    for (session, mine, other) in [(&a, "Bob", "Alice"), (&b, "Alice", "Bob")] {
        let events = collect(
            lab.run(session, "assistant", "what do you know?", "")
                .await
                .expect("run"),
        )
        .await;
        let memory = recalled(&events);
        assert!(
            memory.contains("4711"),
            "shared history in {session}: {memory}"
        );
        assert!(memory.contains(mine), "its own turn in {session}: {memory}");
        assert!(
            !memory.contains(other),
            "not the other branch's in {session}: {memory}"
        );
    }
    lab.stop().await;
}

#[tokio::test]
async fn a_turn_cut_off_by_a_coordinator_restart_ends_failed_with_its_events_kept() {
    let mut lab = lab(&["w1"]).await;
    let s = lab.client.create_session(&[]).await.expect("session").id;
    let mut stream = lab.run(&s, "sleeper", "take a nap", "").await.expect("run");
    let seen = until(&mut stream, |e| {
        matches!(e.event, Some(Event::ToolCallStarted(_)))
    })
    .await;
    drop(stream);
    let turn = seen[0].turn_id.clone();

    let Lab {
        dir,
        coord,
        workers,
        ..
    } = lab;
    let addr = coord.addr;
    coord.stop().await;
    let coord =
        Coordinator::start_on(&addr.to_string(), coordinator_config(&dir.path().join("c"))).await;
    let client = Client::admin(&coord.url()).await;
    let mut agents = AgentServiceClient::new(channel(&coord.url()).await);
    let replay = collect(
        agents
            .watch_turn(authed(
                &client.token,
                v1::WatchTurnRequest {
                    turn_id: turn.clone(),
                    from_seq: 1,
                },
            ))
            .await
            .expect("watch")
            .into_inner(),
    )
    .await;
    assert_eq!(replay[..seen.len()], seen[..], "what was seen is kept");
    let n = replay.len() as u64;
    assert_eq!(seqs(&replay), (1..=n).collect::<Vec<_>>());
    assert!(
        matches!(&replay[replay.len() - 2].event, Some(Event::Error(why)) if why.contains("run the turn again")),
        "{replay:?}"
    );
    assert_eq!(finished(&replay), Some(v1::TurnState::Failed));
    let summary = agents
        .get_turn(authed(&client.token, v1::GetTurnRequest { turn_id: turn }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(summary.state, v1::TurnState::Failed as i32);
    assert_eq!(summary.last_seq, n);
    for w in workers {
        w.stop().await;
    }
    coord.stop().await;
}
