//! `heistctl dev demo` (what `make demo` runs): starts a throwaway local cluster and narrates,
//! step by step with the equivalent heistctl command, workers registering, sessions spreading
//! over the workers, tool calls routed to them, hostile input refused, a sandboxed command, a
//! checkpoint forked onto another worker, an agent turn with tool calls on the scripted model,
//! and sessions closed.
//! Every step checks its outcome, so the demo doubles as a smoke test: any surprise stops it
//! with a non-zero exit and the data directory (with the logs) is kept.

use std::{collections::BTreeSet, path::PathBuf};

use heist_proto::{
    errors::reason,
    v1::{self, turn_event::Event},
};
use serde_json::{Value as Json, json};
use tonic::Code;

use super::StopSignals;
use crate::{
    cli::Context,
    client::Client,
    cluster::{LocalCluster, Options},
    commands::{heist, session, tool, turn::render::Printer, workers},
    error::{EXIT_OK, Error},
    output::{self, CallResultView, Format},
};

/// `println!` that ignores a closed stdout (`heistctl dev demo | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Sessions the demo creates.
const SESSIONS: usize = 4;

/// Flags of `dev demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of workers.
    #[arg(long, env = "HEIST_DEV_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// Directory with the `coordinator` and `worker` binaries (default: next to heistctl, then PATH).
    #[arg(long, env = "HEIST_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Keep the data directory (logs, workspaces) even when every step passed.
    #[arg(long, env = "HEIST_DEMO_KEEP")]
    pub keep: bool,
    /// LOG_LEVEL of the cluster processes.
    #[arg(long, env = "HEIST_DEV_LOG_LEVEL", default_value = "info")]
    pub cluster_log_level: String,
    /// Run the cluster on TLS, with mTLS between the coordinator and the workers (a local
    /// CA and certificates are generated, as `dev up --tls` does).
    #[arg(long, env = "HEIST_DEV_TLS")]
    pub tls: bool,
}

/// Runs the demo.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let mut signals = StopSignals::install()?;
    let n = usize::from(args.workers);
    let mut say = Narrator::default();
    let tls = if args.tls { " --tls" } else { "" };
    say.step(
        &format!("Start a local cluster: one coordinator and {n} workers"),
        &format!("heistctl dev up --workers {n}{tls}"),
    );
    let opts = Options {
        workers: n,
        port: 0,
        data_dir: None,
        // One label per worker so the fork step can name the worker it wants.
        worker_labels: (1..=n).map(|i| format!("name=worker-{i}")).collect(),
        bin_dir: args.bin_dir.clone(),
        log_level: args.cluster_log_level.clone(),
        call_timeout: ctx.timeout(),
        tls: args.tls,
        ..Options::default()
    };
    let cluster = tokio::select! {
        cluster = LocalCluster::start(opts) => cluster?,
        () = signals.recv() => return Err(Error::Interrupted),
    };
    say!(
        "coordinator at {} ({} workers ready; data in {})",
        cluster.coordinator_url(),
        n,
        cluster.data_dir().display()
    );
    if let Some(ca) = cluster.ca_cert() {
        say!(
            "TLS on every link, mTLS between the coordinator and the workers (CA: {})",
            ca.display()
        );
    }
    let data_dir = cluster.data_dir().to_path_buf();

    let outcome = tokio::select! {
        outcome = async {
            let client = cluster.client().await?;
            steps(&mut say, &client, n).await
        } => outcome,
        () = signals.recv() => Err(Error::Interrupted),
    };

    say.step(
        "Stop the cluster (what Ctrl-C does in `heistctl dev up`)",
        "",
    );
    cluster.stop().await?;
    say!("all processes stopped");
    match outcome {
        Ok(()) => {
            if args.keep {
                say!("\ndata dir kept: {}", data_dir.display());
            } else if let Err(e) = std::fs::remove_dir_all(&data_dir) {
                eprintln!("could not remove {}: {e}", data_dir.display());
            }
            say!("\ndemo finished: every step behaved as expected");
            Ok(EXIT_OK)
        }
        Err(err) => {
            eprintln!("logs and workspaces kept in {}", data_dir.display());
            Err(err)
        }
    }
}

/// The narrated steps against a ready cluster.
async fn steps(say: &mut Narrator, client: &Client, n: usize) -> Result<(), Error> {
    // 1. Workers.
    say.step(
        "Workers registered with the coordinator",
        "heistctl workers ls",
    );
    let registered = client.list_workers().await?;
    workers::ls::print(Format::Table, &registered)?;
    let ready = registered
        .iter()
        .filter(|w| w.state == v1::WorkerState::Ready as i32)
        .count();
    expect(ready == n, || format!("{ready} of {n} workers are ready"))?;

    // 2. Sessions spread over the workers.
    say.step(
        &format!(
            "Create {SESSIONS} sessions: the coordinator places each on the least-loaded worker"
        ),
        "heistctl session create",
    );
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let s = client
            .create_session(Default::default(), &session::create::new_request_id())
            .await?;
        say!("created {} on {}", s.id, s.worker_id);
        sessions.push(s);
    }
    say.command("heistctl session ls");
    session::print_many(Format::Table, &client.list_sessions(false, 0).await?)?;
    let used: BTreeSet<&str> = sessions.iter().map(|s| s.worker_id.as_str()).collect();
    let want = n.min(SESSIONS);
    expect(used.len() == want, || {
        format!(
            "sessions landed on {} worker(s), expected {want}",
            used.len()
        )
    })?;
    say!("sessions are spread over {} workers", used.len());

    // 3. Tools, routed to each session's worker.
    say.step(
        "Call tools in every session; each call is routed to the session's worker",
        "heistctl tool ls",
    );
    tool::ls::print(Format::Table, &client.list_tools(None).await?)?;
    for s in &sessions {
        say.sub(&format!("session {} on {}", s.id, s.worker_id));
        tool_calls(say, client, s).await?;
    }

    // 4. Hostile input.
    let first = &sessions[0].id;
    say.step(
        "A schema violation is rejected before the tool runs",
        &format!("heistctl tool call {first} calc --arg expression=42"),
    );
    let err = call(client, first, "calc", json!({"expression": 42}))
        .await
        .expect_err_demo("calc with a number expression was accepted")?;
    output::write_text(&mut std::io::stdout(), &err.report())?;
    expect(
        err.code() == Some(Code::InvalidArgument)
            && err.reason().as_deref() == Some(reason::SCHEMA_VIOLATION),
        || format!("expected INVALID_ARGUMENT/SCHEMA_VIOLATION, got {err:?}"),
    )?;
    say!("(rejected, as expected)");

    say.step(
        "A path that leaves the workspace is refused",
        &format!("heistctl tool call {first} fs.read --arg path=../../../../etc/passwd"),
    );
    match call(
        client,
        first,
        "fs.read",
        json!({"path": "../../../../etc/passwd"}),
    )
    .await
    {
        Err(err) => {
            output::write_text(&mut std::io::stdout(), &err.report())?;
            expect(
                matches!(
                    err.code(),
                    Some(Code::InvalidArgument | Code::PermissionDenied)
                ),
                || format!("expected INVALID_ARGUMENT or PERMISSION_DENIED, got {err:?}"),
            )?;
        }
        Ok(view) => {
            output::write_text(&mut std::io::stdout(), &view.text())?;
            expect(view.is_error && !view.text().contains("root:"), || {
                "fs.read of ../../../../etc/passwd was not refused".to_owned()
            })?;
        }
    }
    say!("(refused, as expected)");

    // 5. Sandbox and checkpoints.
    let forked = sandbox_and_fork(say, client, &sessions[0], n).await?;
    sessions.push(forked);

    // 6. An agent turn.
    agent_turn(say, client, &sessions[0]).await?;

    // 7. Close.
    say.step(
        "Close the sessions (their workspaces are removed)",
        "heistctl session close ID",
    );
    for s in &sessions {
        let closed = client
            .close_session(&s.id, &session::create::new_request_id())
            .await?;
        say!(
            "closed {} ({})",
            closed.id,
            crate::output::session_state(closed.state)
        );
        expect(closed.state == v1::SessionState::Closed as i32, || {
            format!(
                "session {} is {} after close",
                closed.id,
                crate::output::session_state(closed.state)
            )
        })?;
    }
    say.command("heistctl session ls --all");
    session::print_many(Format::Table, &client.list_sessions(true, 0).await?)?;

    // 7. The heist.
    say.step(
        "The heist: six agents plan a job on the scripted model, one of them is a mole; the \
         analyzer's top suspect is accused",
        "heistctl heist run --seed 7 --guess",
    );
    heist_game(client).await
}

/// A whole game: live rounds, the analysis, a guess of the analyzer's top suspect, the reveal.
async fn heist_game(client: &Client) -> Result<(), Error> {
    let painter = heist::Painter::new(Format::Table, false);
    let events = client
        .start_heist(v1::StartHeistRequest {
            seed: 7,
            rounds: 3,
            model: String::new(),
            request_id: session::create::new_request_id(),
        })
        .await?;
    let game = heist::follow(&painter, events).await?;
    let game = game
        .ok_or_else(|| Error::Demo("the heist stream ended without its last event".to_owned()))?;
    expect(game.state == v1::HeistState::AwaitingGuess as i32, || {
        format!("the heist ended {}: {}", game.state, game.failure_reason)
    })?;
    let result = heist::guess_top_suspect(client, &painter, &game.id).await?;
    expect(
        result
            .game
            .as_ref()
            .is_some_and(|g| g.outcome != v1::HeistOutcome::Unspecified as i32),
        || "the guess has no outcome".to_owned(),
    )
}

/// A sandboxed command writes a file, a checkpoint captures the session, and a fork of it lands
/// on another worker with the file intact. Returns the forked session.
async fn sandbox_and_fork(
    say: &mut Narrator,
    client: &Client,
    s: &v1::Session,
    n: usize,
) -> Result<v1::Session, Error> {
    let id = &s.id;
    let script = "echo 'crew of six, one is a mole' > plans/crew.txt && ls plans && \
                  (cat /etc/passwd 2>&1 || echo 'no /etc/passwd in here') | head -1";
    say.step(
        "Run a command in the session's sandbox (a minimal root, namespaces, seccomp, Landlock, cgroups)",
        &format!("heistctl exec {id} -- sh -c \"{script}\""),
    );
    let ran = show(
        call(client, id, "exec", json!({"argv": ["sh", "-c", script]})).await?,
        &s.worker_id,
    )?;
    expect(
        everything(&ran).contains("crew.txt") && !everything(&ran).contains("root:"),
        || "the sandboxed command did not behave as expected".to_owned(),
    )?;

    say.step(
        "Checkpoint the session, then fork it onto another worker",
        &format!("heistctl checkpoint create {id}"),
    );
    let checkpoint = client
        .create_checkpoint(id, Default::default(), &session::create::new_request_id())
        .await?;
    say!(
        "checkpoint {} of {id}: {} files, {} bytes, taken on {}",
        checkpoint.id,
        checkpoint.file_count,
        checkpoint.total_bytes,
        checkpoint.worker_id
    );
    let other = (1..=n)
        .map(|i| format!("worker-{i}"))
        .find(|w| *w != s.worker_id)
        .unwrap_or_else(|| s.worker_id.clone());
    say.command(&format!(
        "heistctl session fork {} --label name={other}",
        checkpoint.id
    ));
    let labels = [("name".to_owned(), other.clone())].into_iter().collect();
    let forked = client
        .fork_session(&checkpoint.id, labels, &session::create::new_request_id())
        .await?;
    say!("forked into {} on {}", forked.id, forked.worker_id);
    expect(forked.worker_id == other, || {
        format!("the fork landed on {}, not {other}", forked.worker_id)
    })?;
    say.command(&format!(
        "heistctl tool call {} fs.read --arg path=plans/crew.txt",
        forked.id
    ));
    let read = show(
        call(
            client,
            &forked.id,
            "fs.read",
            json!({"path": "plans/crew.txt"}),
        )
        .await?,
        &forked.worker_id,
    )?;
    expect(everything(&read).contains("one is a mole"), || {
        "the forked session does not have the checkpointed file".to_owned()
    })?;
    Ok(forked)
}

/// The `assistant` agent on the scripted model reads a file the demo wrote and computes with
/// it: two tool calls, streamed as numbered events, checked, then found in the transcript.
async fn agent_turn(say: &mut Narrator, client: &Client, s: &v1::Session) -> Result<(), Error> {
    let id = &s.id;
    call(
        client,
        id,
        "fs.write",
        json!({"path": "plans/loot.txt", "content": "gold bars: 12, each worth 250\n"}),
    )
    .await?;
    let message = "Read plans/loot.txt and compute 12 * 250";
    say.step(
        "An agent turn: the assistant reads a file and computes, streamed live",
        &format!("heistctl turn {id} assistant \"{message}\""),
    );
    let mut events = client
        .run_turn(id, "assistant", message, &session::create::new_request_id())
        .await?;
    let mut printer = Printer::new(Format::Table);
    let mut seen = Vec::new();
    while let Some(event) = events.message().await? {
        printer.print(&event)?;
        seen.push(event);
    }
    let numbered = seen.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1);
    expect(numbered && !seen.is_empty(), || {
        "the turn's events are not numbered 1, 2, 3, ...".to_owned()
    })?;
    let tools: Vec<(String, bool)> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::ToolCallFinished(c)) => Some((
                c.tool.clone(),
                c.result.as_ref().is_some_and(|r| r.is_error),
            )),
            _ => None,
        })
        .collect();
    expect(
        tools == [("fs.read".to_owned(), false), ("calc".to_owned(), false)],
        || format!("expected fs.read then calc to succeed, got {tools:?}"),
    )?;
    let answered = seen
        .iter()
        .any(|e| matches!(&e.event, Some(Event::FinalMessage(text)) if text.contains("3000")));
    let completed = seen
        .last()
        .is_some_and(|e| e.event == Some(Event::Finished(v1::TurnState::Completed as i32)));
    expect(answered && completed, || {
        "the turn did not complete with an answer citing 3000".to_owned()
    })?;
    say.command(&format!("heistctl transcript {id}"));
    let transcript = client.transcript(id).await?;
    say!("{} events in the session's transcript", transcript.len());
    expect(transcript == seen, || {
        "the transcript does not hold the turn's events".to_owned()
    })
}

/// echo, calc, fs.write, fs.read and fs.list in one session, each checked.
async fn tool_calls(say: &mut Narrator, client: &Client, s: &v1::Session) -> Result<(), Error> {
    let id = &s.id;
    let greeting = format!("hello from {id}");
    say.command(&format!(
        "heistctl tool call {id} echo --arg text='{greeting}'"
    ));
    let echo = show(
        call(client, id, "echo", json!({"text": greeting})).await?,
        &s.worker_id,
    )?;
    expect(everything(&echo).contains(&greeting), || {
        "echo did not return its input".to_owned()
    })?;

    say.command(&format!(
        "heistctl tool call {id} calc --arg expression='2*(3+4)^2'"
    ));
    let calc = show(
        call(client, id, "calc", json!({"expression": "2*(3+4)^2"})).await?,
        &s.worker_id,
    )?;
    expect(everything(&calc).contains("98"), || {
        "calc did not answer 98 for 2*(3+4)^2".to_owned()
    })?;

    let content = format!("the vault opens at midnight ({id})");
    say.command(&format!(
        "heistctl tool call {id} fs.write --arg path=plans/vault.txt --arg content='{content}'"
    ));
    show(
        call(
            client,
            id,
            "fs.write",
            json!({"path": "plans/vault.txt", "content": content}),
        )
        .await?,
        &s.worker_id,
    )?;

    say.command(&format!(
        "heistctl tool call {id} fs.read --arg path=plans/vault.txt"
    ));
    let read = show(
        call(client, id, "fs.read", json!({"path": "plans/vault.txt"})).await?,
        &s.worker_id,
    )?;
    expect(everything(&read).contains(&content), || {
        "fs.read did not return what fs.write wrote".to_owned()
    })?;

    say.command(&format!(
        "heistctl tool call {id} fs.list --arg path=. --arg recursive=true"
    ));
    let list = show(
        call(
            client,
            id,
            "fs.list",
            json!({"path": ".", "recursive": true}),
        )
        .await?,
        &s.worker_id,
    )?;
    expect(everything(&list).contains("vault.txt"), || {
        "fs.list does not show plans/vault.txt".to_owned()
    })
}

/// One tool call with a fresh request id.
async fn call(
    client: &Client,
    session: &str,
    tool: &str,
    args: Json,
) -> Result<CallResultView, Error> {
    let arguments = heist_proto::json::json_to_struct(&args).unwrap_or_default();
    let response = client
        .call_tool(session, tool, arguments, &session::create::new_request_id())
        .await?;
    Ok(CallResultView::from(&response))
}

/// Prints a result like `heistctl tool call` does; a tool error or a call answered by another
/// worker than the session's fails the demo.
fn show(view: CallResultView, worker_id: &str) -> Result<CallResultView, Error> {
    tool::call::print(Format::Table, &view)?;
    expect(!view.is_error, || {
        format!("the tool reported an error: {}", view.text().trim())
    })?;
    expect(
        view.worker_id.is_empty() || view.worker_id == worker_id,
        || format!("the call ran on {} instead of {worker_id}", view.worker_id),
    )?;
    Ok(view)
}

/// Text and structured content of a result, for checks.
fn everything(view: &CallResultView) -> String {
    format!("{}{}", view.text(), view.structured_content)
}

fn expect(ok: bool, what: impl FnOnce() -> String) -> Result<(), Error> {
    if ok { Ok(()) } else { Err(Error::Demo(what())) }
}

/// `expect_err` for results the demo needs to fail.
trait ExpectErr<T> {
    fn expect_err_demo(self, what: &str) -> Result<Error, Error>;
}

impl<T> ExpectErr<T> for Result<T, Error> {
    fn expect_err_demo(self, what: &str) -> Result<Error, Error> {
        match self {
            Ok(_) => Err(Error::Demo(what.to_owned())),
            Err(err) => Ok(err),
        }
    }
}

/// Numbered step headers and command lines.
#[derive(Default)]
struct Narrator {
    step: usize,
}

impl Narrator {
    fn step(&mut self, title: &str, command: &str) {
        self.step += 1;
        say!("\n==> Step {}: {title}", self.step);
        if !command.is_empty() {
            self.command(command);
        }
    }

    fn sub(&self, title: &str) {
        say!("\n--- {title}");
    }

    fn command(&self, command: &str) {
        say!("$ {command}");
    }
}
