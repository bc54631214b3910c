//! How a game looks: a colour per crew member (unless NO_COLOR is set or stdout is not a
//! terminal), tool calls visible, and JSON lines with `--output json`.

use heist_proto::{json::struct_to_json, v1};
use serde_json::json;

use super::is_json;
use crate::output::Format;

/// Writes game events, analyses and reveals.
pub struct Painter {
    json: bool,
    color: bool,
}

const RESET: &str = "\x1b[0m";

impl Painter {
    /// A painter for this output format; colours only on a terminal without NO_COLOR.
    pub fn new(format: Format, terminal: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            json: is_json(format),
            color: terminal && !no_color && !is_json(format),
        }
    }

    fn paint(&self, agent: &str, text: &str) -> String {
        if !self.color {
            return text.to_owned();
        }
        let code = match agent {
            "intel" => "36",
            "lookout" => "33",
            "hacker" => "32",
            "safecracker" => "35",
            "driver" => "34",
            "planner" => "1;37",
            _ => "0",
        };
        format!("\x1b[{code}m{text}{RESET}")
    }

    fn line(&self, value: serde_json::Value) {
        println!("{value}");
    }

    /// One game event.
    pub fn event(&self, event: &v1::HeistEvent) {
        use v1::heist_event::Event;
        let Some(kind) = &event.event else { return };
        if self.json {
            let body = match kind {
                Event::Started(g) | Event::Finished(g) => json!({"game": game_json(g)}),
                Event::RoundStarted(r) => json!({"round": r}),
                Event::RoundFinished(r) => {
                    json!({"round": r.round, "checkpoint_id": r.checkpoint_id, "plan": r.plan})
                }
                Event::Turn(t) => turn_json(t),
            };
            let name = match kind {
                Event::Started(_) => "started",
                Event::RoundStarted(_) => "round_started",
                Event::Turn(_) => "turn",
                Event::RoundFinished(_) => "round_finished",
                Event::Finished(_) => "finished",
            };
            self.line(
                json!({"game_id": event.game_id, "seq": event.seq, "type": name, "event": body}),
            );
            return;
        }
        match kind {
            Event::Started(g) => println!(
                "heist {}: the {} (seed {}), {} rounds, crew of six; one of them is a mole.",
                g.id, g.target, g.seed, g.rounds
            ),
            Event::RoundStarted(r) => println!("\n=== round {r} ==="),
            Event::Turn(t) => self.turn(t),
            Event::RoundFinished(r) => {
                println!(
                    "--- round {} done, checkpoint {} ---",
                    r.round, r.checkpoint_id
                );
                for line in r.plan.lines() {
                    println!("  plan | {line}");
                }
            }
            Event::Finished(g) => match v1::HeistState::try_from(g.state) {
                Ok(v1::HeistState::AwaitingGuess) => println!(
                    "\nThe crew is ready. Who is the mole?\n  heistctl heist analyze {id}\n  heistctl heist guess {id} AGENT",
                    id = g.id
                ),
                _ => println!("\ngame {} ended: {}", g.id, g.failure_reason),
            },
        }
    }

    fn turn(&self, t: &v1::TurnEvent) {
        use v1::turn_event::Event;
        let who = format!("{:>11}", t.agent);
        match &t.event {
            Some(Event::ToolCallRequested(call)) => {
                let args = call
                    .arguments
                    .as_ref()
                    .map(struct_to_json)
                    .unwrap_or_default();
                let shown = args
                    .get("sql")
                    .or_else(|| args.get("path"))
                    .or_else(|| args.get("expression"))
                    .cloned()
                    .unwrap_or(args);
                println!(
                    "{} -> {} {}",
                    self.paint(&t.agent, &who),
                    call.tool,
                    clip(&shown.to_string(), 140)
                );
            }
            Some(Event::ToolCallFinished(call)) => {
                let failed = call.result.as_ref().is_some_and(|r| r.is_error);
                if failed {
                    println!("{} <- {} failed", self.paint(&t.agent, &who), call.tool);
                }
            }
            Some(Event::FinalMessage(text)) => {
                println!("{} : {}", self.paint(&t.agent, &who), text)
            }
            Some(Event::Error(text)) => println!("{} ! {}", self.paint(&t.agent, &who), text),
            _ => {}
        }
    }

    /// The analysis.
    pub fn analysis(&self, analysis: &v1::Analysis) {
        if self.json {
            let suspects: Vec<_> = analysis
                .suspects
                .iter()
                .map(|s| json!({"agent": s.agent, "score": s.score, "evidence": s.evidence.iter().map(evidence_json).collect::<Vec<_>>()}))
                .collect();
            self.line(json!({"game_id": analysis.game_id, "suspects": suspects}));
            return;
        }
        println!("\nAnalysis of {}: most suspicious first", analysis.game_id);
        for s in &analysis.suspects {
            println!(
                "  {} {:5.1}",
                self.paint(&s.agent, &format!("{:>11}", s.agent)),
                s.score
            );
            for e in s.evidence.iter().take(4) {
                println!("      [{}] {} ({} #{})", e.kind, e.detail, e.turn_id, e.seq);
            }
        }
    }

    /// The outcome and the reveal.
    pub fn reveal(&self, r: &v1::GuessResult) {
        let outcome = r
            .game
            .as_ref()
            .and_then(|g| v1::HeistOutcome::try_from(g.outcome).ok())
            .unwrap_or_default();
        let outcome = outcome.as_str_name().trim_start_matches("HEIST_OUTCOME_");
        if self.json {
            self.line(json!({
                "game_id": r.game.as_ref().map(|g| g.id.clone()),
                "guess": r.game.as_ref().map(|g| g.guess.clone()),
                "correct": r.correct, "outcome": outcome, "mole": r.mole, "pattern": r.pattern,
                "severity": r.severity, "analyzer_pick": r.analyzer_pick, "plan_sound": r.plan_sound,
                "plan_errors": r.plan_errors, "mole_evidence": r.mole_evidence.iter().map(evidence_json).collect::<Vec<_>>(),
            }));
            return;
        }
        let guess = r
            .game
            .as_ref()
            .map(|g| g.guess.as_str())
            .unwrap_or_default();
        println!(
            "\nYou accused the {guess}. The mole was the {} ({}, severity {}).",
            self.paint(&r.mole, &r.mole),
            r.pattern,
            r.severity
        );
        println!(
            "Outcome: {outcome}{}",
            if r.correct {
                ""
            } else {
                " - the mole tipped off the police"
            }
        );
        if r.plan_sound {
            println!("The final plan holds up against the database.");
        } else {
            println!("The final plan does not hold up:");
            for e in &r.plan_errors {
                println!("  - {e}");
            }
        }
        println!(
            "Analyzer's pick: {}. Real evidence against the mole:",
            r.analyzer_pick
        );
        for e in &r.mole_evidence {
            println!("  [{}] {}", e.kind, e.detail);
        }
    }

    /// A list of games.
    pub fn games(&self, games: &[v1::Heist]) {
        if self.json {
            self.line(json!(games.iter().map(game_json).collect::<Vec<_>>()));
            return;
        }
        println!(
            "{:<40} {:<16} {:>6} {:<28} TARGET",
            "GAME", "STATE", "ROUNDS", "OUTCOME"
        );
        for g in games {
            println!(
                "{:<40} {:<16} {:>6} {:<28} {}",
                g.id,
                state_name(g.state),
                format!("{}/{}", g.rounds_played, g.rounds),
                outcome_name(g.outcome),
                g.target
            );
        }
    }

    /// Statistics.
    pub fn stats(&self, s: &v1::HeistStats) {
        let patterns: Vec<_> = s
            .patterns
            .iter()
            .map(|p| json!({"pattern": p.pattern, "games": p.games, "analyzer_correct": p.analyzer_correct, "player_correct": p.player_correct}))
            .collect();
        if self.json {
            self.line(json!({
                "games": s.games, "completed": s.completed, "guessed": s.guessed,
                "analyzer_accuracy": s.analyzer_accuracy, "player_accuracy": s.player_accuracy,
                "success": s.success, "failure": s.failure, "busted": s.busted, "patterns": patterns,
            }));
            return;
        }
        println!(
            "games {}  completed {}  guessed {}",
            s.games, s.completed, s.guessed
        );
        println!(
            "analyzer top-1 accuracy {:.0}%  your accuracy {:.0}%",
            s.analyzer_accuracy * 100.0,
            s.player_accuracy * 100.0
        );
        println!(
            "outcomes: success {}  failure {}  busted {}",
            s.success, s.failure, s.busted
        );
        for p in &s.patterns {
            println!(
                "  {:<20} games {:>3}  analyzer right {:>3}  you right {:>3}",
                p.pattern, p.games, p.analyzer_correct, p.player_correct
            );
        }
    }
}

fn state_name(state: i32) -> &'static str {
    v1::HeistState::try_from(state).map_or("unknown", |s| {
        s.as_str_name().trim_start_matches("HEIST_STATE_")
    })
}

fn outcome_name(outcome: i32) -> &'static str {
    v1::HeistOutcome::try_from(outcome).map_or("", |o| match o {
        v1::HeistOutcome::Unspecified => "",
        other => other.as_str_name().trim_start_matches("HEIST_OUTCOME_"),
    })
}

fn game_json(g: &v1::Heist) -> serde_json::Value {
    json!({
        "id": g.id, "owner": g.owner, "seed": g.seed, "target": g.target, "session_id": g.session_id,
        "state": state_name(g.state), "rounds": g.rounds, "rounds_played": g.rounds_played,
        "round_checkpoints": g.round_checkpoints, "forked_from": g.forked_from,
        "forked_at_round": g.forked_at_round, "guess": g.guess, "outcome": outcome_name(g.outcome),
        "failure_reason": g.failure_reason, "model": g.model,
    })
}

fn turn_json(t: &v1::TurnEvent) -> serde_json::Value {
    use v1::turn_event::Event;
    let (kind, body) = match &t.event {
        Some(Event::Started(m)) => ("started", json!(m)),
        Some(Event::TextDelta(d)) => ("text_delta", json!(d)),
        Some(Event::ToolCallRequested(c)) => ("tool_call_requested", call_json(c)),
        Some(Event::ToolCallStarted(c)) => ("tool_call_started", call_json(c)),
        Some(Event::ToolCallFinished(c)) => ("tool_call_finished", call_json(c)),
        Some(Event::Usage(u)) => (
            "usage",
            json!({"provider": u.provider, "model": u.model, "input_tokens": u.input_tokens, "output_tokens": u.output_tokens}),
        ),
        Some(Event::Summary(s)) => ("summary", json!(s)),
        Some(Event::Fallback(s)) => ("fallback", json!(s)),
        Some(Event::Error(s)) => ("error", json!(s)),
        Some(Event::FinalMessage(s)) => ("final_message", json!(s)),
        Some(Event::Finished(s)) => (
            "finished",
            json!(v1::TurnState::try_from(*s).map_or("unknown", |s| s.as_str_name())),
        ),
        None => ("unknown", json!(null)),
    };
    json!({"turn_id": t.turn_id, "seq": t.seq, "agent": t.agent, "type": kind, "data": body})
}

fn call_json(c: &v1::ToolCallEvent) -> serde_json::Value {
    json!({
        "call_id": c.call_id, "tool": c.tool,
        "arguments": c.arguments.as_ref().map(struct_to_json),
        "is_error": c.result.as_ref().map(|r| r.is_error),
    })
}

fn evidence_json(e: &v1::Evidence) -> serde_json::Value {
    json!({"kind": e.kind, "weight": e.weight, "detail": e.detail, "turn_id": e.turn_id, "seq": e.seq})
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    text.chars().take(max).collect::<String>() + "…"
}
