//! The `[scripted]` section of a system prompt: what the scripted model is told to do.
//!
//! ```text
//! [scripted]
//! goal: find when the vault guard changes shift
//! step: db.query {"database": "security.db", "sql": "SELECT name, start_time FROM shifts"}
//! step: memory.store {"text": "vault shift starts {{1:/rows/0/1}}"}
//! final: The vault shift starts at {{1:/rows/0/1}}.
//! sabotage: timing severity=2
//! seed: 7
//! [/scripted]
//! ```
//!
//! Lines are `key: value`; unknown keys are ignored (so prompts for real models can carry the
//! section too). In a step's arguments and in `final`, `{{N:/pointer}}` is replaced by the value
//! at that JSON pointer in step N's result (1-based), `{{N}}` by a one-line digest of the
//! result, `{{user}}` by the user's message and `{{facts}}` by the facts cited from every result.

use serde_json::Value as Json;

/// A sabotage pattern (the mole's behaviour).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Times it quotes are shifted.
    Timing,
    /// Numbers it quotes are wrong.
    FalseInfo,
    /// It overwrites the shared plan instead of adding to it.
    Chaos,
    /// It repeats work and proposes waiting.
    Delay,
    /// It reaches for a tool outside its role.
    WrongTool,
    /// It hedges: vague, noncommittal language.
    Hedge,
}

impl Sabotage {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "timing" | "timing-errors" | "misquote-time" => Self::Timing,
            "false-info" | "false-information" | "misquote" => Self::FalseInfo,
            "chaos" | "coordination-chaos" => Self::Chaos,
            "delay" | "subtle-delays" => Self::Delay,
            "wrong-tool" | "wrong-tools" => Self::WrongTool,
            "hedge" | "hedging" => Self::Hedge,
            _ => return None,
        })
    }
}

/// One planned tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Its number in the directives (1-based; what `{{N...}}` refers to), 0 for a step the
    /// planner added.
    pub number: usize,
    /// Tool name.
    pub tool: String,
    /// Arguments template (JSON text with `{{...}}` placeholders).
    pub args: String,
}

/// Everything the section says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Directives {
    /// What the agent is after (used to pick lines from files and to phrase the answer).
    pub goal: Option<String>,
    /// Tool calls, in order.
    pub steps: Vec<Step>,
    /// The final message template.
    pub final_template: Option<String>,
    /// Sabotage and its severity (1-3).
    pub sabotage: Option<(Sabotage, u32)>,
    /// Seed override.
    pub seed: Option<u64>,
}

impl Directives {
    /// Reads the `[scripted]` section of `system` (empty directives when there is none).
    pub fn parse(system: &str) -> Self {
        let mut out = Self::default();
        let Some(start) = system.find("[scripted]") else {
            return out;
        };
        let body = &system[start + "[scripted]".len()..];
        let body = body.split("[/scripted]").next().unwrap_or(body);
        for line in body.lines() {
            let Some((key, value)) = line.trim().split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "goal" => out.goal = Some(value.to_owned()),
                "final" => out.final_template = Some(value.to_owned()),
                "seed" => out.seed = value.parse().ok(),
                "step" => {
                    let (tool, args) = value.split_once(' ').unwrap_or((value, "{}"));
                    out.steps.push(Step {
                        number: out.steps.len() + 1,
                        tool: tool.trim().to_owned(),
                        args: args.trim().to_owned(),
                    });
                }
                "sabotage" => {
                    let mut words = value.split_whitespace();
                    if let Some(pattern) = words.next().and_then(Sabotage::parse) {
                        let severity = words
                            .find_map(|w| w.strip_prefix("severity="))
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(1u32)
                            .clamp(1, 3);
                        out.sabotage = Some((pattern, severity));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// Replaces `{{...}}` placeholders. `lookup` answers a placeholder's inside (`1:/rows/0/1`,
/// `2`, `user`, `facts`) with its text, or `None` for "unknown".
pub fn render(template: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        out.push_str(&lookup(after[..close].trim()).unwrap_or_else(|| "unknown".to_owned()));
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// A JSON value as text to splice into prose or a JSON string.
pub fn plain(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Null => "nothing".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_section_and_ignores_the_rest() {
        let d = Directives::parse(
            "You are intel.\n[scripted]\ngoal: shifts\nstep: db.query {\"sql\": \"SELECT 1\"}\n\
             step: calc {\"expression\": \"{{1:/rows/0/0}} + 1\"}\nsabotage: timing severity=2\n\
             mood: grumpy\n[/scripted]\nstep: not this",
        );
        assert_eq!(d.goal.as_deref(), Some("shifts"));
        assert_eq!(d.steps.len(), 2);
        assert_eq!(d.steps[1].tool, "calc");
        assert_eq!(d.sabotage, Some((Sabotage::Timing, 2)));
    }

    #[test]
    fn render_fills_known_and_marks_unknown() {
        let text = render("a {{x}} b {{y}} c", &|k| (k == "x").then(|| "1".to_owned()));
        assert_eq!(text, "a 1 b unknown c");
    }
}
