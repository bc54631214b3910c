//! What the cluster adds to agent work, against the same work done in-process
//! ([`inproc`]: the worker's turn loop, scripted model and tools, no coordinator, worker
//! process or gRPC):
//!
//! - `turn`: the `assistant` agent on the scripted model takes a turn with three tool calls
//!   (memory.store, fs.read, calc) through a gRPC client -> coordinator -> worker, streamed to
//!   the end, against the same turn in-process. Rounds alternate (cluster, in-process, ...) so
//!   a drift of the machine hits both sides alike.
//! - `heist`: whole six-agent games through the cluster (StartHeist) against the same seeded
//!   games played by the same engine in-process. A turn's time is measured the same way on
//!   both sides, from the game's event stream: from the previous turn's end (or the round's
//!   start) to its `finished` event, so round checkpoints are outside it (the wall time has
//!   them).
//!
//! The coordinator and one worker run in this process on 127.0.0.1:0, as the integration tests
//! run them.
//!
//! `cargo bench -p heist-coordinator --bench agents` (turns per side: `HEIST_BENCH_TURNS`,
//! default 200 after 20 warm-up; games per side: `HEIST_BENCH_GAMES`, default 3).

mod inproc;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use hdrhistogram::Histogram;
use heist_coordinator::heist::{
    crew::Mole,
    game::{self, Plan, Sink},
    scenario::Scenario,
};
use heist_proto::{
    json::json_to_struct,
    v1::{
        self, agent_service_client::AgentServiceClient, auth_service_client::AuthServiceClient,
        heist_event::Event as HeistEvent, heist_service_client::HeistServiceClient,
        session_service_client::SessionServiceClient, tool_service_client::ToolServiceClient,
        turn_event::Event as TurnEvent,
    },
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

use inproc::InProcess;

/// The turn's message: three tool calls on the scripted model, then an answer citing them.
const MESSAGE: &str =
    "Remember: the van waits at the loading dock. Read plans/loot.txt and compute 12 * 250";
/// The file the turn reads.
const LOOT: &str = "gold bars: 12, each worth 250\n";
/// Tool calls in a measured turn.
const TOOL_CALLS: f64 = 3.0;
/// Rounds per game (the default game).
const ROUNDS: u32 = 3;
const ADMIN: (&str, &str) = ("admin", "bench-admin-secret-0123456789");
const JOIN_TOKEN: &str = "bench-join-token-0123456789";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(tmp.path()).await?;
    let turns = env_or("HEIST_BENCH_TURNS", 200);
    let games = env_or("HEIST_BENCH_GAMES", 3);
    turn_phase(&cluster, turns, (turns / 10).max(1)).await?;
    heist_phase(&cluster, games).await?;
    cluster.stop.cancel();
    Ok(())
}

/// A coordinator and one worker in this process, and an admin token.
struct Cluster {
    channel: Channel,
    token: String,
    stop: CancellationToken,
}

impl Cluster {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let config = heist_coordinator::Config {
            data_dir: dir.join("coordinator"),
            join_token: JOIN_TOKEN.into(),
            admin_client_id: ADMIN.0.into(),
            admin_client_secret: ADMIN.1.into(),
            ..heist_coordinator::Config::default()
        };
        tokio::spawn(heist_coordinator::serve(
            listener,
            config,
            stop.clone().cancelled_owned(),
        ));
        let worker = heist_worker::Config {
            worker_id: "w-bench".into(),
            coordinator_addr: url.clone(),
            base_workspace: dir.join("workspaces"),
            join_token: JOIN_TOKEN.into(),
            ..heist_worker::Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        tokio::spawn(heist_worker::serve(
            listener,
            worker,
            stop.clone().cancelled_owned(),
        ));
        let channel = Channel::from_shared(url)?.connect_lazy();
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            let issued = AuthServiceClient::new(channel.clone())
                .issue_token(v1::IssueTokenRequest {
                    client_id: ADMIN.0.into(),
                    client_secret: ADMIN.1.into(),
                    scopes: Vec::new(),
                })
                .await;
            match issued {
                Ok(resp) => break resp.into_inner().access_token,
                Err(err) if Instant::now() > deadline => bail!("no token: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let cluster = Self {
            channel,
            token,
            stop,
        };
        // Ready once a session can be placed.
        loop {
            match cluster.create_session().await {
                Ok(id) => {
                    cluster.close_session(&id).await?;
                    return Ok(cluster);
                }
                Err(err) if Instant::now() > deadline => bail!("the worker never joined: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn authed<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    async fn create_session(&self) -> anyhow::Result<String> {
        let session = SessionServiceClient::new(self.channel.clone())
            .create_session(self.authed(v1::CreateSessionRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        ensure!(
            session.state == v1::SessionState::Ready as i32,
            "session not ready: {}",
            session.failure_reason
        );
        Ok(session.id)
    }

    async fn close_session(&self, id: &str) -> anyhow::Result<()> {
        SessionServiceClient::new(self.channel.clone())
            .close_session(self.authed(v1::CloseSessionRequest {
                session_id: id.to_owned(),
                request_id: uuid::Uuid::new_v4().to_string(),
            }))
            .await?;
        Ok(())
    }
}

// ---- turn -----------------------------------------------------------------------------------

async fn turn_phase(cluster: &Cluster, count: u64, warmup: u64) -> anyhow::Result<()> {
    let write = json!({"path": "plans/loot.txt", "content": LOOT});
    let (mut through, mut inproc) = (histogram()?, histogram()?);
    // Every round starts from a fresh session on both sides (set up outside the timing), so
    // each turn reads the same short history instead of a conversation growing into its
    // budget.
    for round in 0..warmup + count {
        let session = cluster.create_session().await?;
        ToolServiceClient::new(cluster.channel.clone())
            .call_tool(cluster.authed(v1::CallToolRequest {
                session_id: session.clone(),
                tool: "fs.write".into(),
                arguments: json_to_struct(&write),
                ..Default::default()
            }))
            .await?;
        let local = InProcess::new()?;
        local.tool("fs.write", write.clone()).await?;

        let start = Instant::now();
        check_turn(&cluster_turn(cluster, &session).await?)?;
        let a = start.elapsed();
        let start = Instant::now();
        check_turn(&local.turn("assistant", MESSAGE.to_owned(), "", "").await?)?;
        let b = start.elapsed();
        if round >= warmup {
            through.record(nanos(a))?;
            inproc.record(nanos(b))?;
        }
        cluster.close_session(&session).await?;
    }

    let ms = |n: u64| n as f64 / 1e6;
    println!(
        "turn: {count} scripted turns with 3 tool calls on each side, alternating, after {warmup} warm-up"
    );
    println!("{:<28} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for (name, h) in [
        ("client->coordinator->worker", &through),
        ("in-process", &inproc),
    ] {
        println!(
            "{name:<28} {:>10.3} {:>10.3}",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        );
    }
    let added = ms(through.value_at_quantile(0.5)) - ms(inproc.value_at_quantile(0.5));
    println!(
        "ratio (p50)                  {:>9.2}x",
        through.value_at_quantile(0.5) as f64 / inproc.value_at_quantile(0.5) as f64
    );
    println!(
        "added per turn (p50)         {added:>10.3} ms, {:.3} ms per tool-call step",
        added / TOOL_CALLS
    );
    println!();
    Ok(())
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000_000, 3)?)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

async fn cluster_turn(cluster: &Cluster, session: &str) -> anyhow::Result<Vec<v1::TurnEvent>> {
    let mut stream = AgentServiceClient::new(cluster.channel.clone())
        .run_turn(cluster.authed(v1::RunTurnRequest {
            session_id: session.to_owned(),
            agent: "assistant".into(),
            message: MESSAGE.into(),
            request_id: uuid::Uuid::new_v4().to_string(),
        }))
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.push(event);
    }
    Ok(events)
}

/// The turn ran memory.store, fs.read and calc, and completed.
fn check_turn(events: &[v1::TurnEvent]) -> anyhow::Result<()> {
    let tools: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(TurnEvent::ToolCallFinished(c))
                if !c.result.as_ref().is_some_and(|r| r.is_error) =>
            {
                Some(c.tool.as_str())
            }
            _ => None,
        })
        .collect();
    let completed = events
        .last()
        .is_some_and(|e| e.event == Some(TurnEvent::Finished(v1::TurnState::Completed as i32)));
    ensure!(
        tools == ["memory.store", "fs.read", "calc"] && completed,
        "the turn should run memory.store, fs.read and calc and complete; it ran {tools:?}, \
         last events: {:?}",
        &events[events.len().saturating_sub(3)..]
    );
    Ok(())
}

// ---- heist ----------------------------------------------------------------------------------

async fn heist_phase(cluster: &Cluster, games: u64) -> anyhow::Result<()> {
    let (mut through, mut inproc) = (Played::new()?, Played::new()?);
    for game in 0..games {
        let seed = 1000 + game;
        through.add(cluster_game(cluster, seed).await?)?;
        inproc.add(local_game(seed).await?)?;
    }
    let wall = |p: &Played| p.wall.as_secs_f64() * 1000.0 / games.max(1) as f64;
    let per_s = |p: &Played| p.turns.len() as f64 / p.wall.as_secs_f64().max(1e-9);
    let mean = |p: &Played| p.turns.mean() / 1e6;
    println!(
        "heist: {games} six-agent games of {ROUNDS} rounds on each side, alternating ({} turns each)",
        through.turns.len()
    );
    println!(
        "{:<28} {:>14} {:>10} {:>14}",
        "", "game wall ms", "turns/s", "turn mean ms"
    );
    for (name, p) in [("through the cluster", &through), ("in-process", &inproc)] {
        println!(
            "{name:<28} {:>14.1} {:>10.1} {:>14.3}",
            wall(p),
            per_s(p),
            mean(p)
        );
    }
    println!(
        "added per turn (mean)        {:>10.3} ms ({:.2}x)",
        mean(&through) - mean(&inproc),
        mean(&through) / mean(&inproc)
    );
    Ok(())
}

/// Timed games.
struct Played {
    wall: Duration,
    turns: Histogram<u64>,
}

impl Played {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            wall: Duration::ZERO,
            turns: histogram()?,
        })
    }

    fn add(&mut self, (wall, turns): (Duration, Vec<Duration>)) -> anyhow::Result<()> {
        self.wall += wall;
        for t in turns {
            self.turns.record(nanos(t))?;
        }
        Ok(())
    }
}

/// Each turn's time from a game's timestamped events: from the previous turn's end (or the
/// round's start) to the turn's `finished`.
fn turn_times(events: &[(Instant, HeistEvent)]) -> Vec<Duration> {
    let mut times = Vec::new();
    let mut mark = None;
    for (at, event) in events {
        match event {
            HeistEvent::RoundStarted(_) => mark = Some(*at),
            HeistEvent::Turn(t) if matches!(t.event, Some(TurnEvent::Finished(_))) => {
                if let Some(start) = mark {
                    times.push(at.duration_since(start));
                }
                mark = Some(*at);
            }
            HeistEvent::RoundFinished(_) => mark = None,
            _ => {}
        }
    }
    times
}

async fn cluster_game(cluster: &Cluster, seed: u64) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let start = Instant::now();
    let mut stream = HeistServiceClient::new(cluster.channel.clone())
        .start_heist(cluster.authed(v1::StartHeistRequest {
            seed,
            rounds: ROUNDS,
            model: String::new(),
            request_id: uuid::Uuid::new_v4().to_string(),
        }))
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.message().await? {
        if let Some(event) = message.event {
            events.push((Instant::now(), event));
        }
    }
    let wall = start.elapsed();
    let finished = events.iter().any(|(_, e)| {
        matches!(e, HeistEvent::Finished(h) if h.state == v1::HeistState::AwaitingGuess as i32)
    });
    ensure!(
        finished,
        "the heist with seed {seed} did not finish its rounds"
    );
    Ok((wall, turn_times(&events)))
}

/// A sink that timestamps every event.
struct Stamped(Vec<(Instant, HeistEvent)>);

impl Sink for Stamped {
    fn emit(&mut self, event: HeistEvent) -> Result<(), heist_coordinator::Error> {
        self.0.push((Instant::now(), event));
        Ok(())
    }
}

async fn local_game(seed: u64) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let local = InProcess::new()?;
    let (scenario, mole) = (Scenario::generate(seed), Mole::for_seed(seed));
    let plan = Plan {
        scenario: &scenario,
        mole: &mole,
        first_round: 1,
        rounds: ROUNDS,
        model: "",
        note: "",
        session: None,
    };
    let mut sink = Stamped(Vec::new());
    let start = Instant::now();
    game::play(&local, plan, &mut sink, &mut game::Played::default())
        .await
        .context("the in-process heist failed")?;
    Ok((start.elapsed(), turn_times(&sink.0)))
}
