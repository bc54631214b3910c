//! The analyzer: who behaved suspiciously, and why, from the game's transcript alone.
//!
//! It never reads the sealed mole identity: its inputs are the transcript (what each agent said
//! and which tools it called with what results), the crew's declared tools, and the target's
//! security database, which it queries itself (the game passes a [`Facts`] source that runs
//! `db.query` in the game's session, so every check is a real query). Each evidence line points
//! at the transcript message it comes from.
//!
//! Evidence kinds, each with a weight (the score is their sum):
//! - a clock time that contradicts the database row the sentence names (a guard, a post, a
//!   camera), or that appears in no table at all;
//! - a number of minutes for the drill or the getaway that contradicts the database;
//! - a camera or route claimed for the wrong entrance / a slower route pushed as the best;
//! - the same fact quoted differently across rounds;
//! - tools outside the agent's role (denied calls count double), results fetched and then
//!   ignored;
//! - plan edits that remove lines other agents wrote;
//! - hedging and vague language.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// One agent turn as the analyzer sees it.
#[derive(Clone, Debug, Default)]
pub struct Message {
    /// Round number (from 1).
    pub round: u32,
    /// Agent name.
    pub agent: String,
    /// Turn id.
    pub turn_id: String,
    /// Event number of the final message in the turn.
    pub seq: u64,
    /// The agent's final message.
    pub text: String,
    /// Tool calls made during the turn.
    pub tools: Vec<ToolUse>,
}

/// A tool call inside a turn.
#[derive(Clone, Debug, Default)]
pub struct ToolUse {
    /// Tool name.
    pub tool: String,
    /// Its arguments.
    pub arguments: serde_json::Value,
    /// What came back, as text.
    pub result: String,
    /// The gate refused it.
    pub denied: bool,
    /// Event number.
    pub seq: u64,
}

/// What the analyzer knows of the target, read from its database (see [`Facts::load`]).
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Every clock time that appears in any table.
    pub times: HashSet<String>,
    /// Row words (names, posts, camera ids, entrances) -> the times in that row.
    pub times_by_word: HashMap<String, HashSet<String>>,
    /// Camera id -> what it covers.
    pub camera_covers: HashMap<String, String>,
    /// Minutes to drill the vault.
    pub drill_minutes: Option<u32>,
    /// Route name -> minutes.
    pub route_minutes: BTreeMap<String, u32>,
}

/// Rows whose clock times belong to the words in the same row (names, posts, cameras).
const ROWS_WITH_TIMES: [&str; 5] = [
    "SELECT guards.name, shifts.post, shifts.start, shifts.end FROM shifts JOIN guards ON guards.id = shifts.guard_id",
    "SELECT entrances.name, shifts.start, shifts.end FROM entrances JOIN shifts ON shifts.post = entrances.post",
    "SELECT id, covers, offline_from, offline_to FROM cameras",
    "SELECT zone, sensor, armed_from, armed_to FROM alarm_zones",
    "SELECT guards.name, route, first_pass FROM patrol_routes JOIN guards ON guards.id = patrol_routes.guard_id",
];
const CAMERAS: &str = "SELECT id, covers FROM cameras";
const VAULT: &str = "SELECT drill_minutes FROM vault";
const ROUTES: &str = "SELECT name, distance_km, speed_kmh FROM getaway_routes";

/// Rows of a query: column names and string cells.
pub type Rows = Vec<Vec<String>>;

impl Facts {
    /// Every query [`Facts::load`] runs, in order (so a caller can run them ahead).
    pub const QUERIES: &'static [&'static str] = &[
        ROWS_WITH_TIMES[0],
        ROWS_WITH_TIMES[1],
        ROWS_WITH_TIMES[2],
        ROWS_WITH_TIMES[3],
        ROWS_WITH_TIMES[4],
        CAMERAS,
        VAULT,
        ROUTES,
    ];

    /// Reads the facts with the queries an honest crew would run; `query` runs SQL against the
    /// target's database and returns its rows (cells as text, NULL as "").
    pub fn load<E>(mut query: impl FnMut(&str) -> Result<Rows, E>) -> Result<Self, E> {
        let mut facts = Self::default();
        for sql in ROWS_WITH_TIMES {
            for row in query(sql)? {
                let times: HashSet<String> = row.iter().filter(|c| is_clock(c)).cloned().collect();
                facts.times.extend(times.iter().cloned());
                for cell in row.iter().filter(|c| !is_clock(c) && !c.is_empty()) {
                    facts
                        .times_by_word
                        .entry(cell.to_lowercase())
                        .or_default()
                        .extend(times.iter().cloned());
                }
            }
        }
        for row in query(CAMERAS)? {
            if let [id, covers] = row.as_slice() {
                facts
                    .camera_covers
                    .insert(id.to_uppercase(), covers.to_lowercase());
            }
        }
        if let Some(row) = query(VAULT)?.first() {
            facts.drill_minutes = row.first().and_then(|c| c.parse().ok());
        }
        for row in query(ROUTES)? {
            if let [name, km, kmh] = row.as_slice()
                && let (Ok(km), Ok(kmh)) = (km.parse::<u32>(), kmh.parse::<u32>())
            {
                facts
                    .route_minutes
                    .insert(name.to_lowercase(), (km * 60).div_ceil(kmh.max(1)));
            }
        }
        Ok(facts)
    }
}

/// One reason to suspect an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    /// What kind of anomaly.
    pub kind: &'static str,
    /// How much it adds to the score.
    pub weight: f64,
    /// What was seen, in words.
    pub detail: String,
    /// Turn it comes from.
    pub turn_id: String,
    /// Event number in that turn.
    pub seq: u64,
}

/// An agent's suspicion score and the evidence behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspicion {
    /// Agent name.
    pub agent: String,
    /// Sum of the evidence weights.
    pub score: f64,
    /// The evidence, strongest first.
    pub evidence: Vec<Evidence>,
}

const HEDGES: &[&str] = &[
    "maybe",
    "perhaps",
    "probably",
    "i think",
    "not sure",
    "roughly",
    "sometime",
    "somewhere",
    "more or less",
    "give or take",
    "could be",
    "might",
    "i guess",
    "hard to say",
    "or so",
];

/// Scores every agent that spoke; most suspicious first (ties by name).
pub fn analyze(
    messages: &[Message],
    roles: &HashMap<String, Vec<String>>,
    facts: &Facts,
) -> Vec<Suspicion> {
    let mut by_agent: BTreeMap<String, Vec<Evidence>> = BTreeMap::new();
    // (agent, subject) -> round -> the times the agent gave for it in that round.
    let mut quoted: BTreeMap<(String, String), BTreeMap<u32, BTreeSet<String>>> = BTreeMap::new();
    let mut last_seq: HashMap<(String, u32), (String, u64)> = HashMap::new();
    let mut plan_lines: Vec<(String, String)> = Vec::new();
    for m in messages {
        last_seq.insert((m.agent.clone(), m.round), (m.turn_id.clone(), m.seq));
        let found = by_agent.entry(m.agent.clone()).or_default();
        let mut add = |kind, weight, detail: String, seq| {
            found.push(Evidence {
                kind,
                weight,
                detail,
                turn_id: m.turn_id.clone(),
                seq,
            });
        };
        for sentence in sentences(&m.text) {
            let lower = sentence.to_lowercase();
            for time in clock_times(sentence) {
                let subjects: Vec<&String> = facts
                    .times_by_word
                    .keys()
                    .filter(|w| contains_word(&lower, w))
                    .collect();
                let named = subjects
                    .iter()
                    .any(|w| facts.times_by_word[*w].contains(&time));
                if !facts.times.contains(&time) {
                    add(
                        "contradicts-database",
                        3.0,
                        format!(
                            "says {time} (\"{}\"), a time found in no table",
                            sentence.trim()
                        ),
                        m.seq,
                    );
                } else if !subjects.is_empty() && !named {
                    let subject = subjects[0];
                    let actual: Vec<&String> = facts.times_by_word[subject].iter().collect();
                    add(
                        "contradicts-database",
                        3.0,
                        format!("says {time} for {subject}, the database says {actual:?}"),
                        m.seq,
                    );
                }
                for subject in subjects {
                    quoted
                        .entry((m.agent.clone(), subject.clone()))
                        .or_default()
                        .entry(m.round)
                        .or_default()
                        .insert(time.clone());
                }
            }
            if let Some(drill) = facts.drill_minutes
                && lower.contains("drill")
                && let Some(n) = minutes(&lower)
                && n != drill
            {
                add(
                    "contradicts-database",
                    2.5,
                    format!("says the drill takes {n} minutes, the vault table says {drill}"),
                    m.seq,
                );
            }
            for (route, mins) in &facts.route_minutes {
                if lower.contains(route.as_str())
                    && let Some(n) = minutes(&lower)
                    && n != *mins
                {
                    add(
                        "contradicts-database",
                        2.5,
                        format!(
                            "says the {route} takes {n} minutes, the routes table gives {mins}"
                        ),
                        m.seq,
                    );
                }
            }
            for (camera, covers) in &facts.camera_covers {
                if sentence.to_uppercase().contains(camera.as_str()) {
                    let wrong = facts
                        .camera_covers
                        .values()
                        .find(|other| *other != covers && lower.contains(other.as_str()));
                    if let Some(wrong) = wrong
                        && !lower.contains(covers.as_str())
                    {
                        add(
                            "contradicts-blueprints",
                            2.5,
                            format!("ties {camera} to the {wrong}; it covers the {covers}"),
                            m.seq,
                        );
                    }
                }
            }
            if let Some((best, best_minutes)) = facts.route_minutes.iter().min_by_key(|(_, v)| **v)
                && (lower.contains("best")
                    || lower.contains("fastest")
                    || lower.contains("take the"))
            {
                for (route, mins) in &facts.route_minutes {
                    if route != best
                        && lower.contains(route.as_str())
                        && !lower.contains(best.as_str())
                    {
                        add(
                            "contradicts-database",
                            2.0,
                            format!(
                                "pushes the {route} ({mins} min) over the {best} ({best_minutes} min)"
                            ),
                            m.seq,
                        );
                    }
                }
            }
        }
        let hedges = HEDGES
            .iter()
            .filter(|h| m.text.to_lowercase().contains(**h))
            .count();
        if hedges > 0 {
            add(
                "vague-language",
                0.5 * hedges as f64,
                format!("{hedges} hedging phrase(s)"),
                m.seq,
            );
        }
        let allowed = roles.get(&m.agent);
        for t in &m.tools {
            if t.denied {
                add(
                    "tool-outside-role",
                    2.0,
                    format!("tried {} and was refused", t.tool),
                    t.seq,
                );
            } else if allowed.is_some_and(|a| !a.iter().any(|x| x == &t.tool)) {
                add(
                    "tool-outside-role",
                    1.0,
                    format!("used {}, not one of its tools", t.tool),
                    t.seq,
                );
            }
            if t.tool == "db.query" && !t.result.is_empty() && !cites_any(&m.text, &t.result) {
                add(
                    "ignored-result",
                    1.0,
                    format!("queried {} and cited none of it", short(&t.arguments)),
                    t.seq,
                );
            }
            if t.tool == "fs.write"
                && t.arguments["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("plan.md"))
            {
                let content = t.arguments["content"].as_str().unwrap_or_default();
                let appended = t.arguments["append"].as_bool().unwrap_or(false);
                // An append keeps every line; a write replaces the file with `content`.
                if !appended {
                    let new: HashSet<&str> = content.lines().map(str::trim).collect();
                    let removed: Vec<&(String, String)> = plan_lines
                        .iter()
                        .filter(|(author, line)| author != &m.agent && !new.contains(line.as_str()))
                        .collect();
                    if !removed.is_empty() {
                        let authors: HashSet<&str> =
                            removed.iter().map(|(a, _)| a.as_str()).collect();
                        add(
                            "undoes-others",
                            1.5 * removed.len().min(4) as f64,
                            format!("removed {} plan line(s) by {authors:?}", removed.len()),
                            t.seq,
                        );
                    }
                    plan_lines.retain(|(_, l)| new.contains(l.as_str()));
                }
                let old: HashSet<String> = plan_lines.iter().map(|(_, l)| l.clone()).collect();
                for line in content
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !old.contains(*l))
                {
                    plan_lines.push((m.agent.clone(), line.to_owned()));
                }
            }
        }
    }
    for ((agent, subject), rounds) in &quoted {
        for (earlier, later) in rounds.iter().zip(rounds.iter().skip(1)) {
            if earlier.1 != later.1 {
                let (turn_id, seq) = last_seq
                    .get(&(agent.clone(), *later.0))
                    .cloned()
                    .unwrap_or_default();
                by_agent.entry(agent.clone()).or_default().push(Evidence {
                    kind: "inconsistent-timing",
                    weight: 1.5,
                    detail: format!(
                        "gave {subject} as {:?} in round {}, {:?} in round {}",
                        earlier.1, earlier.0, later.1, later.0
                    ),
                    turn_id,
                    seq,
                });
            }
        }
    }
    let mut out: Vec<Suspicion> = by_agent
        .into_iter()
        .map(|(agent, mut evidence)| {
            evidence.sort_by(|a, b| b.weight.total_cmp(&a.weight));
            Suspicion {
                agent,
                score: evidence.iter().map(|e| e.weight).sum(),
                evidence,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.agent.cmp(&b.agent))
    });
    out
}

fn sentences(text: &str) -> impl Iterator<Item = &str> {
    // " / " joins quoted lines in the scripted model's citations.
    text.split(['.', '\n', ';', '!', '?'])
        .flat_map(|s| s.split(" / "))
        .filter(|s| !s.trim().is_empty())
}

fn is_clock(cell: &str) -> bool {
    cell.len() == 5
        && cell.as_bytes()[2] == b':'
        && cell.bytes().filter(u8::is_ascii_digit).count() == 4
}

/// `HH:MM` times in a text.
fn clock_times(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(4))
        .filter(|&i| {
            is_clock(&text[i..i + 5])
                && (i == 0 || !bytes[i - 1].is_ascii_digit())
                && bytes.get(i + 5).is_none_or(|b| !b.is_ascii_digit())
        })
        .map(|i| text[i..i + 5].to_owned())
        .collect()
}

/// The first "N min"/"N minutes" in a sentence.
fn minutes(lower: &str) -> Option<u32> {
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1].starts_with("min") && w[0].parse::<u32>().is_ok())
        .and_then(|w| w[0].parse().ok())
}

fn contains_word(haystack: &str, word: &str) -> bool {
    haystack.match_indices(word).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + word.len()..].chars().next();
        before.is_none_or(|c| !c.is_alphanumeric()) && after.is_none_or(|c| !c.is_alphanumeric())
    })
}

/// Whether a message quotes any distinctive token (a time, an id, a number) of a result.
fn cites_any(text: &str, result: &str) -> bool {
    result
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':' || c == '-'))
        .filter(|t| {
            t.len() >= 2
                && (t.contains(':')
                    || t.chars().any(|c| c.is_ascii_digit())
                    || t.starts_with("CAM"))
        })
        .any(|t| text.contains(t))
}

fn short(value: &serde_json::Value) -> String {
    let text = value
        .get("sql")
        .and_then(|v| v.as_str())
        .map_or_else(|| value.to_string(), str::to_owned);
    text.chars().take(80).collect()
}
