//! Printing turn events: people get the model's text inline and one line per tool call;
//! `--output json` gets one JSON object per event and line (the stable shape below).

use std::io::Write as _;

use heist_proto::{
    json::struct_to_json,
    v1::{self, turn_event::Event},
};
use serde_json::{Value as Json, json};

use crate::{
    error::Error,
    output::{CallResultView, Format, write_text},
};

/// The lowercase name of a turn state.
pub fn state_name(state: i32) -> &'static str {
    match v1::TurnState::try_from(state) {
        Ok(v1::TurnState::Running) => "running",
        Ok(v1::TurnState::Completed) => "completed",
        Ok(v1::TurnState::StepLimit) => "step_limit",
        Ok(v1::TurnState::Cancelled) => "cancelled",
        Ok(v1::TurnState::Failed) => "failed",
        _ => "unknown",
    }
}

fn call_json(call: &v1::ToolCallEvent) -> Json {
    json!({
        "call_id": call.call_id,
        "tool": call.tool,
        "arguments": call.arguments.as_ref().map_or(Json::Null, struct_to_json),
        "result": call.result.as_ref().map_or(Json::Null, |r| {
            serde_json::to_value(CallResultView::from(r)).unwrap_or(Json::Null)
        }),
    })
}

/// An event as JSON: `turn_id`, `seq`, `agent`, `type` and the type's fields.
pub fn event_json(e: &v1::TurnEvent) -> Json {
    let mut out = json!({"turn_id": e.turn_id, "seq": e.seq, "agent": e.agent});
    let (kind, body) = match &e.event {
        Some(Event::Started(m)) => ("started", json!({"message": m})),
        Some(Event::TextDelta(t)) => ("text_delta", json!({"text": t})),
        Some(Event::ToolCallRequested(c)) => ("tool_call_requested", call_json(c)),
        Some(Event::ToolCallStarted(c)) => ("tool_call_started", call_json(c)),
        Some(Event::ToolCallFinished(c)) => ("tool_call_finished", call_json(c)),
        Some(Event::Usage(u)) => (
            "usage",
            json!({"provider": u.provider, "model": u.model, "input_tokens": u.input_tokens,
                   "output_tokens": u.output_tokens, "cost_micros": u.cost_micros}),
        ),
        Some(Event::Summary(s)) => ("summary", json!({"summary": s})),
        Some(Event::Fallback(s)) => ("fallback", json!({"message": s})),
        Some(Event::Error(s)) => ("error", json!({"message": s})),
        Some(Event::FinalMessage(t)) => ("final_message", json!({"text": t})),
        Some(Event::Finished(s)) => ("finished", json!({"state": state_name(*s)})),
        None => ("unknown", json!({})),
    };
    if let (Json::Object(o), Json::Object(b)) = (&mut out, body) {
        o.insert("type".to_owned(), json!(kind));
        o.extend(b);
    }
    out
}

/// Prints events as they come, keeping track of the line the model's text is on.
#[derive(Debug)]
pub struct Printer {
    format: Format,
    /// The model's text left a line open.
    mid_line: bool,
}

impl Printer {
    /// A printer in `format`.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            mid_line: false,
        }
    }

    /// Prints one event.
    pub fn print(&mut self, e: &v1::TurnEvent) -> Result<(), Error> {
        let mut out = std::io::stdout().lock();
        if self.format == Format::Json {
            return write_text(&mut out, &format!("{}\n", event_json(e)));
        }
        let line = match &e.event {
            Some(Event::TextDelta(t)) => {
                self.mid_line = true;
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
                return Ok(());
            }
            // The answer was just streamed as text: end its line rather than repeat it.
            Some(Event::FinalMessage(_)) if self.mid_line => String::new(),
            Some(Event::Started(m)) => format!("[{}] {} ← {m}", e.turn_id, e.agent),
            Some(Event::ToolCallRequested(c)) => format!(
                "  → {} {}",
                c.tool,
                c.arguments.as_ref().map_or(Json::Null, struct_to_json)
            ),
            Some(Event::ToolCallFinished(c)) => {
                let result = c.result.as_ref().map(CallResultView::from);
                let text = result
                    .as_ref()
                    .map(CallResultView::text)
                    .unwrap_or_default();
                let first = text.lines().next().unwrap_or_default();
                let mark = if result.is_some_and(|r| r.is_error) {
                    "✗"
                } else {
                    "✓"
                };
                format!("  {mark} {}: {first}", c.tool)
            }
            Some(Event::Summary(s)) => format!("  (earlier turns summarised: {s})"),
            Some(Event::Fallback(s)) => format!("  (model: {s})"),
            Some(Event::Error(s)) => format!("error: {s}"),
            Some(Event::FinalMessage(t)) => format!("{}: {t}", e.agent),
            Some(Event::Finished(s)) => {
                format!("[{} {}, {} events]", e.turn_id, state_name(*s), e.seq)
            }
            Some(Event::ToolCallStarted(_) | Event::Usage(_)) | None => return Ok(()),
        };
        let lead = if self.mid_line { "\n" } else { "" };
        self.mid_line = false;
        if line.is_empty() {
            return write_text(&mut out, lead);
        }
        write_text(&mut out, &format!("{lead}{line}\n"))
    }
}

/// The exit code for a turn that ended in `state` (0 only when it completed).
pub fn exit_code(state: Option<i32>) -> u8 {
    match state.and_then(|s| v1::TurnState::try_from(s).ok()) {
        Some(v1::TurnState::Completed) => crate::error::EXIT_OK,
        _ => crate::error::EXIT_ERROR,
    }
}
