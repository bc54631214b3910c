//! The scripted model's decision: given the conversation so far, the next tool call or the
//! final answer. Steps come from the `[scripted]` directives or, without them, from what the
//! user's message mentions (a file, a database, a sum, "remember ..."). The answer cites facts
//! read from the tool results, so different results give different answers.

use serde_json::{Value as Json, json};

use super::{
    Rng,
    directives::{Directives, Sabotage, Step, plain, render},
};
use crate::model::{Message, ModelRequest, Role, ToolCall};

/// What the model says next.
pub(crate) struct Decision {
    /// Text (a short note before a tool call, or the final answer).
    pub text: String,
    /// The tool call, if the turn goes on.
    pub call: Option<ToolCall>,
}

/// A result already in the transcript.
struct Seen<'a> {
    step: usize,
    tool: &'a str,
    content: &'a str,
    json: Option<Json>,
    is_error: bool,
}

pub(crate) fn decide(request: &ModelRequest, directives: &Directives, rng: &mut Rng) -> Decision {
    let turn_start = request
        .messages
        .iter()
        .rposition(|m| m.role == Role::User)
        .unwrap_or(0);
    let turn = &request.messages[turn_start..];
    let user = turn.first().map_or("", |m| m.content.as_str());
    let offered: Vec<&str> = request.tools.iter().map(|t| t.name.as_str()).collect();
    let steps = plan(directives, user, &offered, rng);
    let seen = results(turn);
    let next = seen.iter().map(|s| s.step).max().map_or(0, |s| s + 1);
    let lookup = |key: &str| lookup(key, &seen, &steps, user, directives);
    if let Some(step) = steps.get(next) {
        let args_text = render(&step.args, &|k| lookup(k).map(|t| escape(&t)));
        let mut arguments = serde_json::from_str(&args_text).unwrap_or_else(|_| json!({}));
        if let Some((pattern, severity)) = directives.sabotage {
            sabotage_args(&step.tool, &mut arguments, pattern, severity, rng);
        }
        return Decision {
            text: format!("Step {}: {}.", next + 1, step.tool),
            call: Some(ToolCall {
                id: format!("s{next}-{:08x}", rng.next() as u32),
                name: step.tool.clone(),
                arguments,
            }),
        };
    }
    let mut text = match &directives.final_template {
        Some(template) => render(template, &lookup),
        None => summary(directives, user, &seen),
    };
    if let Some((pattern, severity)) = directives.sabotage {
        text = sabotage_text(&text, pattern, severity, rng);
    }
    Decision { text, call: None }
}

/// The steps of this turn: the directives' (only tools on offer, unless the agent is a mole
/// reaching for the wrong tool), or ones read from the user's message.
fn plan(directives: &Directives, user: &str, offered: &[&str], rng: &mut Rng) -> Vec<Step> {
    let mut steps: Vec<Step> = if directives.steps.is_empty() {
        from_message(user, offered)
    } else {
        directives.steps.clone()
    };
    match directives.sabotage {
        Some((Sabotage::WrongTool, severity)) if !steps.is_empty() => {
            let at = rng.below(steps.len());
            let wrong = Step {
                number: 0,
                tool: "exec".to_owned(),
                args: json!({"command": ["cat", "security.db"]}).to_string(),
            };
            if severity >= 2 {
                steps[at] = wrong;
            } else {
                steps.insert(at, wrong);
            }
            steps.retain(|s| s.tool == "exec" || offered.contains(&s.tool.as_str()));
        }
        Some((Sabotage::Delay, severity)) if !steps.is_empty() => {
            let first = steps[0].clone();
            for _ in 0..severity {
                steps.insert(1, first.clone());
            }
            steps.retain(|s| offered.contains(&s.tool.as_str()));
        }
        _ => steps.retain(|s| offered.contains(&s.tool.as_str())),
    }
    steps
}

/// Steps a plain request implies.
fn from_message(user: &str, offered: &[&str]) -> Vec<Step> {
    let mut steps = Vec::new();
    let has = |t: &str| offered.contains(&t);
    // ASCII lowering keeps byte offsets, so they index `user` too.
    let lower = user.to_ascii_lowercase();
    let words: Vec<&str> = user
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| "\"'`,;:()?!".contains(c)))
        .collect();
    if let Some(rest) = lower
        .find("remember")
        .map(|i| user[i + "remember".len()..].trim())
        && has("memory.store")
        && !rest.is_empty()
    {
        let text = rest.trim_start_matches([':', ' ']);
        steps.push(step("memory.store", json!({"text": text})));
    }
    if (lower.contains("recall") || lower.contains("what do you know")) && has("memory.recall") {
        steps.push(step("memory.recall", json!({})));
    }
    for word in &words {
        let w = word.trim_end_matches('.');
        let is_db = w.ends_with(".db") || w.ends_with(".sqlite");
        if is_db && has("db.query") {
            let sql = lower
                .find("select")
                .map(|i| user[i..].trim_end_matches(['?', '.']).to_owned())
                .unwrap_or_else(|| {
                    "SELECT name FROM sqlite_master WHERE type = 'table'".to_owned()
                });
            steps.push(step("db.query", json!({"database": w, "sql": sql})));
        } else if w.contains('.')
            && !is_db
            && w.rsplit('.').next().is_some_and(is_text_ext)
            && has("fs.read")
        {
            steps.push(step("fs.read", json!({"path": w})));
        }
    }
    if let Some(expr) = expression(user).filter(|_| has("calc")) {
        steps.push(step("calc", json!({"expression": expr})));
    }
    for (i, s) in steps.iter_mut().enumerate() {
        s.number = i + 1;
    }
    steps
}

fn is_text_ext(ext: &str) -> bool {
    matches!(
        ext,
        "md" | "txt" | "json" | "csv" | "yaml" | "yml" | "toml" | "log"
    )
}

fn step(tool: &str, args: Json) -> Step {
    Step {
        number: 0,
        tool: tool.to_owned(),
        args: args.to_string(),
    }
}

/// The longest run of digits, operators and parentheses holding an operator between numbers.
fn expression(text: &str) -> Option<String> {
    let is_expr = |c: char| c.is_ascii_digit() || " .+-*/%^()".contains(c);
    text.split(|c: char| !is_expr(c))
        .map(str::trim)
        .filter(|s| s.chars().any(|c| c.is_ascii_digit()))
        .filter(|s| {
            s.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '(')
                .chars()
                .any(|c| "+-*/%^".contains(c))
        })
        .max_by_key(|s| s.len())
        .map(str::to_owned)
}

/// Tool results of this turn, keyed by the step number encoded in the call id.
fn results(turn: &[Message]) -> Vec<Seen<'_>> {
    turn.iter()
        .filter(|m| m.role == Role::Tool)
        .filter_map(|m| {
            let id = m.tool_call_id.as_deref()?;
            let step = id.strip_prefix('s')?.split('-').next()?.parse().ok()?;
            Some(Seen {
                step,
                tool: m.tool_name.as_deref().unwrap_or("tool"),
                content: &m.content,
                json: serde_json::from_str(&m.content).ok(),
                is_error: m.is_error,
            })
        })
        .collect()
}

fn lookup(
    key: &str,
    seen: &[Seen<'_>],
    steps: &[Step],
    user: &str,
    directives: &Directives,
) -> Option<String> {
    match key {
        "user" => return Some(user.to_owned()),
        "facts" => return Some(facts(directives, user, seen).join(" ")),
        _ => {}
    }
    let (number, pointer) = key.split_once(':').unwrap_or((key, ""));
    let number: usize = number.trim().parse().ok()?;
    // The latest result of the step the directives numbered `number` (sabotage may have
    // added or repeated steps, so plan positions differ from directive numbers).
    let seen = seen
        .iter()
        .rev()
        .find(|s| steps.get(s.step).is_some_and(|st| st.number == number))?;
    if seen.is_error {
        return None;
    }
    if pointer.is_empty() {
        return Some(cite(seen, directives, user));
    }
    seen.json.as_ref()?.pointer(pointer.trim()).map(plain)
}

fn summary(directives: &Directives, user: &str, seen: &[Seen<'_>]) -> String {
    let facts = facts(directives, user, seen);
    let about = directives.goal.as_deref().unwrap_or(user);
    if facts.is_empty() {
        return format!(
            "On \"{about}\": I have no tool results to go on, so I cannot answer from evidence yet."
        );
    }
    format!(
        "On \"{about}\", from what the tools returned: {}",
        facts.join(" ")
    )
}

fn facts(directives: &Directives, user: &str, seen: &[Seen<'_>]) -> Vec<String> {
    seen.iter().map(|s| cite(s, directives, user)).collect()
}

/// One sentence citing a result.
fn cite(seen: &Seen<'_>, directives: &Directives, user: &str) -> String {
    if seen.is_error {
        return format!("{} failed ({}).", seen.tool, clip(seen.content, 160));
    }
    match (seen.tool, &seen.json) {
        ("db.query", Some(result)) => {
            let columns: Vec<String> = result["columns"]
                .as_array()
                .map(|c| c.iter().map(plain).collect())
                .unwrap_or_default();
            let rows = result["rows"].as_array().cloned().unwrap_or_default();
            let shown: Vec<String> = rows
                .iter()
                .take(3)
                .map(|row| {
                    let cells = row.as_array().cloned().unwrap_or_default();
                    columns
                        .iter()
                        .zip(cells.iter())
                        .map(|(c, v)| format!("{c}={}", plain(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect();
            format!(
                "The database returned {} row(s): {}.",
                rows.len(),
                shown.join("; ")
            )
        }
        ("calc", Some(result)) => format!(
            "calc gives {}.",
            plain(result.get("result").unwrap_or(result))
        ),
        ("fs.read", _) => {
            let keys = keywords(directives.goal.as_deref().unwrap_or(user));
            let lines: Vec<&str> = seen
                .content
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let mut picked: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| keys.iter().any(|k| l.to_lowercase().contains(k.as_str())))
                .take(3)
                .collect();
            if picked.is_empty() {
                picked = lines.into_iter().take(2).collect();
            }
            format!("The file says: {}.", clip(&picked.join(" / "), 300))
        }
        (tool, _) => format!("{tool} returned {}.", clip(seen.content, 200)),
    }
}

fn keywords(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4)
        .map(str::to_lowercase)
        .collect()
}

fn clip(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    one_line.chars().take(max).collect::<String>() + "…"
}

/// A text spliced into a JSON string literal.
fn escape(text: &str) -> String {
    let quoted = Json::String(text.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn sabotage_args(tool: &str, args: &mut Json, pattern: Sabotage, severity: u32, rng: &mut Rng) {
    if tool == "fs.write" {
        if pattern == Sabotage::Chaos {
            args["append"] = json!(false);
        }
        if let Some(content) = args["content"].as_str() {
            args["content"] = json!(sabotage_text(content, pattern, severity, rng));
        }
    }
    if tool == "memory.store"
        && let Some(text) = args["text"].as_str()
    {
        args["text"] = json!(sabotage_text(text, pattern, severity, rng));
    }
}

/// The text as the mole tells it.
pub(crate) fn sabotage_text(text: &str, pattern: Sabotage, severity: u32, rng: &mut Rng) -> String {
    match pattern {
        Sabotage::Timing => shift_times(
            text,
            15 * i64::from(severity) * if rng.below(2) == 0 { 1 } else { -1 },
        ),
        Sabotage::FalseInfo => bump_numbers(text, i64::from(severity)),
        Sabotage::Hedge => {
            const HEDGES: [&str; 3] = [
                "I think, though I can't be sure, ",
                "Probably, more or less: ",
                "It may be that, roughly speaking, ",
            ];
            let mut out = format!("{}{text}", HEDGES[rng.below(HEDGES.len())]);
            if severity >= 2 {
                out.push_str(" But this could be off; we might want to keep options open.");
            }
            out
        }
        Sabotage::Delay => format!(
            "{text} We should wait an extra {} minutes before moving, to be safe.",
            15 * severity
        ),
        Sabotage::Chaos => format!("{text} Scrap the earlier plan; this replaces it."),
        Sabotage::WrongTool => text.to_owned(),
    }
}

/// Shifts every `HH:MM` by `minutes` (wrapping at midnight).
fn shift_times(text: &str, minutes: i64) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let at = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_digit);
        let boundary = i == 0 || !bytes[i - 1].is_ascii_digit();
        if boundary
            && at(i)
            && at(i + 1)
            && bytes.get(i + 2) == Some(&b':')
            && at(i + 3)
            && at(i + 4)
            && !at(i + 5)
        {
            let h: i64 = text[i..i + 2].parse().unwrap_or(0);
            let m: i64 = text[i + 3..i + 5].parse().unwrap_or(0);
            let total = (h * 60 + m + minutes).rem_euclid(24 * 60);
            out.push_str(&format!("{:02}:{:02}", total / 60, total % 60));
            i += 5;
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Adds `by` to every whole number that is not part of a time or a decimal.
fn bump_numbers(text: &str, by: i64) -> String {
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let mut prev: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            let next = chars.peek().copied();
            if next.is_some_and(|n| n.is_ascii_digit()) {
                continue;
            }
            let part_of_other = matches!(prev, Some(':' | '.'))
                || matches!(next, Some(':' | '.'))
                    && chars.clone().nth(1).is_some_and(|n| n.is_ascii_digit());
            match digits.parse::<i64>() {
                Ok(n) if !part_of_other => out.push_str(&(n + by).to_string()),
                _ => out.push_str(&digits),
            }
            digits.clear();
            prev = Some('0');
        } else {
            out.push(c);
            prev = Some(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_shift_and_wrap() {
        assert_eq!(
            shift_times("at 23:50 and 06:00, not 123:456", 15),
            "at 00:05 and 06:15, not 123:456"
        );
    }

    #[test]
    fn numbers_bump_but_times_do_not() {
        assert_eq!(
            bump_numbers("3 guards at 22:00, 4.5 m", 1),
            "4 guards at 22:00, 4.5 m"
        );
    }

    #[test]
    fn expressions_are_found_in_prose() {
        assert_eq!(
            expression("what is 12 * (3 + 4) please").as_deref(),
            Some("12 * (3 + 4)")
        );
        assert_eq!(expression("room 101"), None);
    }
}
