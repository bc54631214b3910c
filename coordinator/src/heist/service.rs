//! Games at the coordinator: start (a tracked task plays the rounds), watch, fork, analyze,
//! guess, statistics. Records are prost messages in sled (`heist_games`), the sealed mole in
//! its own tree (`heist_seals`, read only for a guess and for statistics of guessed games), and
//! each game's events in an [`EventLog`] (`heist_events`), so a game outlives the stream that
//! started it and a coordinator restart keeps every game.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::stream::BoxStream;
use heist_proto::v1 as pb;
use tracing::{Instrument as _, info, info_span, warn};

use super::{
    crew::{Mole, Pattern},
    game::{self, Plan, Ports, Sink},
    ports::ClusterPorts,
    scenario::Scenario,
};
use crate::{Principal, app::App, error::Error, eventlog::EventLog, store::Store};

/// Most rounds a game may have.
pub const MAX_ROUNDS: u32 = 10;
/// Rounds when the request says 0.
pub const DEFAULT_ROUNDS: u32 = 3;

/// The games a coordinator keeps.
pub struct Heists {
    store: Store,
    games: sled::Tree,
    seals: sled::Tree,
    events: Arc<EventLog<pb::HeistEvent>>,
}

/// What StartHeist asks for.
pub struct NewGame {
    /// Target seed (0: random).
    pub seed: u64,
    /// Rounds (0: default).
    pub rounds: u32,
    /// Model chain ("" = the workers' default).
    pub model: String,
}

/// What ForkHeist asks for.
pub struct ForkGame {
    /// Game to fork.
    pub game: String,
    /// After which round.
    pub round: u32,
    /// Model chain for the rest ("" = the game's).
    pub model: String,
    /// The player's note.
    pub note: String,
}

impl Heists {
    /// Opens the trees. Games a previous process left RUNNING are marked FAILED: their task
    /// died with it (fork one from its last round to play on).
    pub fn open(store: &Store) -> Result<Self, Error> {
        let heists = Self {
            games: store.open_tree("heist_games")?,
            seals: store.open_tree("heist_seals")?,
            events: EventLog::open(store, "heist_events")?,
            store: store.clone(),
        };
        for record in Store::load_all::<pb::HeistRecord>(&heists.games, "heist game")? {
            let Some(mut game) = record.game.clone() else {
                continue;
            };
            if game.state == pb::HeistState::Running as i32 {
                game.state = pb::HeistState::Failed as i32;
                game.failure_reason = format!(
                    "the coordinator restarted during round {}: fork the game from its last round to play on",
                    game.rounds_played + 1
                );
                heists.put(&pb::HeistRecord {
                    game: Some(game),
                    ..record
                })?;
            }
        }
        Ok(heists)
    }

    fn put(&self, record: &pb::HeistRecord) -> Result<(), Error> {
        let id = record
            .game
            .as_ref()
            .map(|g| g.id.clone())
            .unwrap_or_default();
        Store::put(&self.games, id.as_bytes(), record)
    }

    /// The player's game record (NOT_FOUND for another player's, unless admin).
    pub fn record(&self, principal: &Principal, id: &str) -> Result<pb::HeistRecord, Error> {
        let record: Option<pb::HeistRecord> = Store::get(&self.games, id.as_bytes(), "heist game")?;
        record
            .filter(|r| {
                r.game.as_ref().is_some_and(|g| {
                    g.owner == principal.id || principal.has(heist_proto::scopes::ADMIN)
                })
            })
            .ok_or_else(|| not_found(id))
    }

    /// Starts a game; its id. The rounds play in a tracked task.
    pub async fn start(
        app: &Arc<App>,
        principal: &Principal,
        new: NewGame,
    ) -> Result<String, Error> {
        let seed = if new.seed == 0 {
            fastrand::u64(1..u64::MAX)
        } else {
            new.seed
        };
        let rounds = match new.rounds {
            0 => DEFAULT_ROUNDS,
            r if r <= MAX_ROUNDS => r,
            r => {
                return Err(invalid(format!(
                    "rounds {r} is more than {MAX_ROUNDS}: ask for fewer"
                )));
            }
        };
        let scenario = Scenario::generate(seed);
        let mole = Mole::for_seed(seed);
        let game = new_game(principal, seed, &scenario.target, rounds, &new.model);
        let id = game.id.clone();
        let heists = &app.heists;
        Store::put(
            &heists.seals,
            id.as_bytes(),
            &pb::HeistSeal {
                mole: mole.agent.clone(),
                pattern: mole.pattern.name().to_owned(),
                severity: mole.severity,
            },
        )?;
        heists.put(&pb::HeistRecord {
            game: Some(game.clone()),
            ..Default::default()
        })?;
        heists.store.flush().await?;
        heists.events.open_stream(&id);
        spawn_play(
            app,
            principal,
            game,
            scenario,
            mole,
            1,
            None,
            String::new(),
            Vec::new(),
        );
        Ok(id)
    }

    /// Forks a game after one of its rounds; the new game's id.
    pub async fn fork(
        app: &Arc<App>,
        principal: &Principal,
        fork: ForkGame,
    ) -> Result<String, Error> {
        let heists = &app.heists;
        let parent = heists.record(principal, &fork.game)?;
        let parent_game = parent.game.clone().unwrap_or_default();
        if fork.round == 0 || fork.round > parent_game.rounds_played {
            return Err(invalid(format!(
                "game {} has {} finished round(s): fork after one of them (1..={})",
                fork.game, parent_game.rounds_played, parent_game.rounds_played
            )));
        }
        let checkpoint = parent_game.round_checkpoints[(fork.round - 1) as usize].clone();
        let scenario = Scenario::generate(parent_game.seed);
        let mole = Mole::for_seed(parent_game.seed);
        let model = if fork.model.is_empty() {
            parent_game.model.clone()
        } else {
            fork.model
        };
        let mut game = new_game(
            principal,
            parent_game.seed,
            &scenario.target,
            parent_game.rounds,
            &model,
        );
        game.forked_from = parent_game.id.clone();
        game.forked_at_round = fork.round;
        game.rounds_played = fork.round;
        game.round_checkpoints = parent_game.round_checkpoints[..fork.round as usize].to_vec();
        let id = game.id.clone();
        // The rounds before the fork are part of the new game's story (and its analysis).
        let before: Vec<pb::HeistEvent> = heists
            .events
            .read(&parent_game.id, 1, usize::MAX)?
            .into_iter()
            .map(|(_, e)| e)
            .take_while(|e| !matches!(&e.event, Some(pb::heist_event::Event::RoundStarted(r)) if *r > fork.round))
            .filter(|e| !matches!(e.event, Some(pb::heist_event::Event::Started(_)) | Some(pb::heist_event::Event::Finished(_))))
            .collect();
        let seal: Option<pb::HeistSeal> =
            Store::get(&heists.seals, parent_game.id.as_bytes(), "heist seal")?;
        Store::put(&heists.seals, id.as_bytes(), &seal.unwrap_or_default())?;
        heists.put(&pb::HeistRecord {
            game: Some(game.clone()),
            note: fork.note.clone(),
            ..Default::default()
        })?;
        heists.store.flush().await?;
        heists.events.open_stream(&id);
        let ports = ClusterPorts {
            app: app.clone(),
            principal: principal.clone(),
        };
        let session = ports.fork(&checkpoint).await?;
        spawn_play(
            app,
            principal,
            game,
            scenario,
            mole,
            fork.round + 1,
            Some(session),
            fork.note,
            before,
        );
        Ok(id)
    }

    /// A game's events from `from_seq` on, live until it finishes.
    pub fn watch(
        &self,
        principal: &Principal,
        id: &str,
        from_seq: u64,
    ) -> Result<BoxStream<'static, Result<pb::HeistEvent, Error>>, Error> {
        self.record(principal, id)?;
        Ok(self.events.follow(id, from_seq))
    }

    /// The player's games, newest first, after `after` (a game id from a previous page).
    pub fn list(
        &self,
        principal: &Principal,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::Heist>, Error> {
        let admin = principal.has(heist_proto::scopes::ADMIN);
        let mut out = Vec::new();
        let iter = match after {
            Some(key) => self.games.range(..key.as_bytes().to_vec()),
            None => self.games.range::<Vec<u8>, _>(..),
        };
        for item in iter.rev() {
            let (_, bytes) = item?;
            let record: pb::HeistRecord =
                prost::Message::decode(bytes.as_ref()).map_err(|source| Error::Corrupt {
                    what: "heist game",
                    source,
                })?;
            if let Some(game) = record.game
                && (admin || game.owner == principal.id)
            {
                out.push(game);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The analysis of a game whose rounds are over (computed once, then kept).
    pub async fn analyze(
        app: &Arc<App>,
        principal: &Principal,
        id: &str,
    ) -> Result<pb::Analysis, Error> {
        let heists = &app.heists;
        let mut record = heists.record(principal, id)?;
        if let Some(analysis) = &record.analysis {
            return Ok(analysis.clone());
        }
        let game = record.game.clone().unwrap_or_default();
        if game.state != pb::HeistState::AwaitingGuess as i32
            && game.state != pb::HeistState::Done as i32
        {
            return Err(precondition(format!(
                "game {id} is still being played: analyze it once its rounds are over (heistctl heist watch {id})"
            )));
        }
        let events: Vec<pb::HeistEvent> = heists
            .events
            .read(id, 1, usize::MAX)?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let ports = ClusterPorts {
            app: app.clone(),
            principal: principal.clone(),
        };
        let suspects = game::analyze(&ports, &game.session_id, &events).await?;
        let analysis = pb::Analysis {
            game_id: id.to_owned(),
            suspects: suspects
                .into_iter()
                .map(|s| pb::Suspect {
                    agent: s.agent,
                    score: s.score,
                    evidence: s
                        .evidence
                        .into_iter()
                        .map(|e| pb::Evidence {
                            kind: e.kind.to_owned(),
                            weight: e.weight,
                            detail: e.detail,
                            turn_id: e.turn_id,
                            seq: e.seq,
                        })
                        .collect(),
                })
                .collect(),
        };
        record.analysis = Some(analysis.clone());
        heists.put(&record)?;
        heists.store.flush().await?;
        Ok(analysis)
    }

    /// The player's guess, the outcome and the reveal.
    pub async fn guess(
        app: &Arc<App>,
        principal: &Principal,
        id: &str,
        agent: &str,
    ) -> Result<pb::GuessResult, Error> {
        let heists = &app.heists;
        if !super::crew::ROLES.contains(&agent) {
            return Err(invalid(format!(
                "{agent:?} is not in the crew: guess one of {}",
                super::crew::ROLES.join(", ")
            )));
        }
        let analysis = Self::analyze(app, principal, id).await?;
        let mut record = heists.record(principal, id)?;
        let mut game = record.game.clone().unwrap_or_default();
        if game.state != pb::HeistState::AwaitingGuess as i32 {
            return Err(precondition(format!(
                "game {id} was already guessed: see it with heistctl heist show {id}"
            )));
        }
        let seal: pb::HeistSeal =
            Store::get(&heists.seals, id.as_bytes(), "heist seal")?.unwrap_or_default();
        let plan = heists
            .events
            .read(id, 1, usize::MAX)?
            .into_iter()
            .filter_map(|(_, e)| match e.event {
                Some(pb::heist_event::Event::RoundFinished(r)) => Some(r.plan),
                _ => None,
            })
            .next_back()
            .unwrap_or_default();
        let plan_errors = game::check_plan(&plan, &Scenario::generate(game.seed).facts());
        let correct = agent == seal.mole;
        let outcome = game::outcome(correct, plan_errors.is_empty());
        game.guess = agent.to_owned();
        game.outcome = outcome as i32;
        game.state = pb::HeistState::Done as i32;
        let result = pb::GuessResult {
            game: Some(game.clone()),
            correct,
            mole: seal.mole.clone(),
            pattern: seal.pattern.clone(),
            severity: seal.severity,
            mole_evidence: analysis
                .suspects
                .iter()
                .find(|s| s.agent == seal.mole)
                .map(|s| s.evidence.clone())
                .unwrap_or_default(),
            analyzer_pick: analysis
                .suspects
                .first()
                .map(|s| s.agent.clone())
                .unwrap_or_default(),
            plan_sound: plan_errors.is_empty(),
            plan_errors,
        };
        record.game = Some(game);
        record.result = Some(result.clone());
        heists.put(&record)?;
        heists.store.flush().await?;
        info!(game_id = %id, correct, "heist guessed");
        // The game is over: its session goes (the analysis is kept, the round checkpoints stay
        // for forks), so finished games do not hold worker slots.
        let ports = ClusterPorts {
            app: app.clone(),
            principal: principal.clone(),
        };
        if let Some(session) = record
            .game
            .as_ref()
            .map(|g| g.session_id.clone())
            .filter(|s| !s.is_empty())
            && let Err(err) = ports.close_session(&session).await
        {
            warn!(game_id = %id, error = %err, "cannot close the finished game's session");
        }
        Ok(result)
    }

    /// Statistics over the player's games (every game for an admin).
    pub fn stats(&self, principal: &Principal) -> Result<pb::HeistStats, Error> {
        let admin = principal.has(heist_proto::scopes::ADMIN);
        let mut stats = pb::HeistStats::default();
        let mut patterns: std::collections::BTreeMap<String, pb::PatternStats> = Pattern::ALL
            .iter()
            .map(|p| {
                (
                    p.name().to_owned(),
                    pb::PatternStats {
                        pattern: p.name().to_owned(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let (mut analyzer_right, mut player_right) = (0u32, 0u32);
        for record in Store::load_all::<pb::HeistRecord>(&self.games, "heist game")? {
            let Some(game) = &record.game else { continue };
            if !(admin || game.owner == principal.id) {
                continue;
            }
            stats.games += 1;
            if game.rounds_played == game.rounds {
                stats.completed += 1;
            }
            let Some(result) = &record.result else {
                continue;
            };
            stats.guessed += 1;
            let analyzer_hit = result.analyzer_pick == result.mole;
            analyzer_right += u32::from(analyzer_hit);
            player_right += u32::from(result.correct);
            match pb::HeistOutcome::try_from(game.outcome) {
                Ok(pb::HeistOutcome::Success) => stats.success += 1,
                Ok(pb::HeistOutcome::Failure) => stats.failure += 1,
                Ok(pb::HeistOutcome::Busted) => stats.busted += 1,
                _ => {}
            }
            let p = patterns.entry(result.pattern.clone()).or_default();
            p.games += 1;
            p.analyzer_correct += u32::from(analyzer_hit);
            p.player_correct += u32::from(result.correct);
        }
        if stats.guessed > 0 {
            stats.analyzer_accuracy = f64::from(analyzer_right) / f64::from(stats.guessed);
            stats.player_accuracy = f64::from(player_right) / f64::from(stats.guessed);
        }
        stats.patterns = patterns.into_values().collect();
        Ok(stats)
    }
}

fn new_game(principal: &Principal, seed: u64, target: &str, rounds: u32, model: &str) -> pb::Heist {
    pb::Heist {
        id: format!("h-{}", uuid::Uuid::now_v7()),
        owner: principal.id.clone(),
        seed,
        target: target.to_owned(),
        state: pb::HeistState::Running as i32,
        rounds,
        started_at: Some(std::time::SystemTime::now().into()),
        model: model.to_owned(),
        ..Default::default()
    }
}

/// The game's events, numbered, into the event log.
struct LogSink {
    heists: Arc<App>,
    game: String,
    seq: AtomicU64,
}

impl LogSink {
    /// Appends an event that is already in the game's record (the rounds a fork inherits).
    fn replay(&self, event: pb::heist_event::Event) -> Result<(), Error> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let event = pb::HeistEvent {
            game_id: self.game.clone(),
            seq,
            event: Some(event),
        };
        self.heists.heists.events.append(&self.game, seq, &event)
    }

    fn push(&self, event: pb::heist_event::Event) -> Result<(), Error> {
        if let pb::heist_event::Event::RoundFinished(round) = &event {
            // The record follows the rounds, so GetHeist and a fork see them as they finish.
            let heists = &self.heists.heists;
            if let Some(mut record) = heists.record_raw(&self.game)
                && let Some(game) = record.game.as_mut()
            {
                game.rounds_played = round.round;
                game.round_checkpoints.push(round.checkpoint_id.clone());
                heists.put(&record)?;
            }
        }
        self.replay(event)
    }
}

impl Sink for LogSink {
    fn emit(&mut self, event: pb::heist_event::Event) -> Result<(), Error> {
        self.push(event)
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_play(
    app: &Arc<App>,
    principal: &Principal,
    mut game: pb::Heist,
    scenario: Scenario,
    mole: Mole,
    first_round: u32,
    session: Option<String>,
    note: String,
    before: Vec<pb::HeistEvent>,
) {
    let app = app.clone();
    let principal = principal.clone();
    let span = info_span!("heist", game_id = %game.id, seed = game.seed);
    app.tasks.clone().spawn(
        async move {
            let id = game.id.clone();
            let mut sink = LogSink {
                heists: app.clone(),
                game: id.clone(),
                seq: AtomicU64::new(0),
            };
            let mut started = game.clone();
            started.session_id = session.clone().unwrap_or_default();
            let run = || -> Result<(), Error> {
                sink.push(pb::heist_event::Event::Started(started.clone()))?;
                for e in before {
                    if let Some(event) = e.event {
                        sink.replay(event)?;
                    }
                }
                Ok(())
            };
            let mut outcome = run();
            let ports = ClusterPorts {
                app: app.clone(),
                principal,
            };
            if outcome.is_ok() {
                let plan = Plan {
                    scenario: &scenario,
                    mole: &mole,
                    first_round,
                    rounds: game.rounds,
                    model: &game.model,
                    note: &note,
                    session,
                };
                let mut played = game::Played::default();
                let result = game::play(&ports, plan, &mut sink, &mut played).await;
                game.session_id = played.session.clone();
                match result {
                    Ok(()) => game.state = pb::HeistState::AwaitingGuess as i32,
                    Err(err) => {
                        // Nobody can guess a failed game: its session would hold a worker slot
                        // for nothing. The rounds it checkpointed stay, so it can be forked.
                        if !played.session.is_empty()
                            && let Err(close) = ports.close_session(&played.session).await
                        {
                            warn!(error = %close, "cannot close the failed game's session");
                        }
                        outcome = Err(err);
                    }
                }
            }
            if let Err(err) = outcome {
                warn!(error = %err, "heist game failed");
                game.state = pb::HeistState::Failed as i32;
                game.failure_reason = err.to_string();
            }
            let heists = &app.heists;
            let mut record = heists.record_raw(&id).unwrap_or_default();
            if let Some(stored) = &record.game {
                game.rounds_played = stored.rounds_played;
                game.round_checkpoints = stored.round_checkpoints.clone();
            }
            record.game = Some(game.clone());
            if let Err(err) = heists.put(&record) {
                warn!(error = %err, "cannot store the game's end");
            }
            game.last_seq = sink.seq.load(Ordering::SeqCst) + 1;
            let _ = sink.push(pb::heist_event::Event::Finished(game));
            if let Err(err) = heists.events.close(&id).await {
                warn!(error = %err, "cannot flush the game's events");
            }
        }
        .instrument(span),
    );
}

impl Heists {
    fn record_raw(&self, id: &str) -> Option<pb::HeistRecord> {
        Store::get(&self.games, id.as_bytes(), "heist game")
            .ok()
            .flatten()
    }
}

fn not_found(id: &str) -> Error {
    Error::Status(tonic::Status::not_found(format!(
        "game {id} not found: list yours with heistctl heist ls"
    )))
}

fn invalid(message: String) -> Error {
    Error::Status(tonic::Status::invalid_argument(message))
}

fn precondition(message: String) -> Error {
    Error::Status(tonic::Status::failed_precondition(message))
}
