//! `heistctl exec SESSION [--shell] [--cwd DIR] [--env K=V]... [--stdin FILE|-] -- CMD...`:
//! runs a command in the session's sandbox, streams its stdout and stderr to ours as it runs,
//! and exits with its exit code (128 + the signal when a signal killed it, 124 when it timed
//! out, like `timeout(1)`). With `--output json` nothing is streamed; the result is printed as
//! JSON instead.
//!
//! Also the streaming runner `run-python` shares.

use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use heist_proto::v1::{self, tool_event::Event};
use serde_json::{Map, Value as Json, json};

use crate::{
    cli::{Context, parse_key_values},
    commands::{session::create::new_request_id, tool::call::print},
    error::{EXIT_ERROR, EXIT_OK, Error},
    output::{CallResultView, Format},
};

/// Exit code of a command stopped by its timeout (what `timeout(1)` uses).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Extra time the call gets beyond the command's own timeout, for starting and reporting.
const CALL_SLACK: Duration = Duration::from_secs(10);

/// Flags of `exec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub session: String,
    /// The command and its arguments (put them after `--`).
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Run the words as one shell command line (`/bin/sh -c "CMD..."`), so pipes and globs work.
    #[arg(long, short = 's')]
    pub shell: bool,
    /// Working directory, relative to the workspace.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable for the command, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// File whose content is the command's stdin (`-` for heistctl's own stdin).
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<String>,
    /// The command's wall-clock timeout in seconds (default: the worker's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout_s: Option<f64>,
    /// Client request id: a retry with the same id replays the first result.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `exec`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let mut arguments = Map::new();
    if args.shell {
        arguments.insert("command".to_owned(), json!(args.command.join(" ")));
    } else {
        arguments.insert("argv".to_owned(), json!(args.command));
    }
    if let Some(cwd) = args.cwd {
        arguments.insert("cwd".to_owned(), json!(cwd));
    }
    if !args.env.is_empty() {
        let env = parse_key_values("--env", &args.env)?;
        arguments.insert("env".to_owned(), json!(env));
    }
    if let Some(source) = &args.stdin {
        arguments.insert("stdin".to_owned(), json!(read_input(source)?));
    }
    if let Some(t) = args.timeout_s {
        arguments.insert("timeout_s".to_owned(), json!(t));
    }
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    stream_tool(
        ctx,
        &args.session,
        "exec",
        arguments,
        &request_id,
        args.timeout_s,
    )
    .await
}

/// Reads a text input: a file, or stdin for `-`.
pub fn read_input(source: &str) -> Result<String, Error> {
    let mut text = String::new();
    if source == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::io("cannot read stdin (it must be UTF-8 text)", e))?;
    } else {
        text = std::fs::read_to_string(source)
            .map_err(|e| Error::io(format!("cannot read {source} (it must be UTF-8 text)"), e))?;
    }
    Ok(text)
}

/// Calls `tool` with CallToolStream, copying output to our stdout/stderr as it arrives (or,
/// with `--output json`, printing only the result), and returns the command's exit code.
pub async fn stream_tool(
    ctx: &Context,
    session: &str,
    tool: &str,
    arguments: Map<String, Json>,
    request_id: &str,
    timeout_s: Option<f64>,
) -> Result<u8, Error> {
    let deadline = match timeout_s.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(t) => ctx.timeout().max(t + CALL_SLACK),
        None => ctx.timeout(),
    };
    let mut events = ctx
        .client()
        .await?
        .call_tool_stream(
            session,
            tool,
            heist_proto::json::map_to_struct(&arguments),
            request_id,
            deadline,
        )
        .await?;
    let live = matches!(ctx.format(), Format::Table);
    let mut streamed = false;
    let result = loop {
        let Some(event) = events.message().await? else {
            return Err(Error::Rpc(tonic::Status::unavailable(
                "the stream ended without a result: run the command again",
            )));
        };
        match event.event {
            Some(Event::Output(chunk)) if live => {
                streamed = true;
                write_chunk(&chunk)?;
            }
            Some(Event::Result(result)) => break result,
            _ => {}
        }
    };
    if !live {
        print(ctx.format(), &CallResultView::from(&result))?;
        return Ok(exit_code(&result));
    }
    if !streamed {
        // A replayed result, or a command that printed nothing: show what the result holds.
        write_captured(&result)?;
    }
    if let Some(note) = ending_note(&result) {
        eprintln!("heistctl: {note}");
    }
    Ok(exit_code(&result))
}

fn write_chunk(chunk: &v1::OutputChunk) -> Result<(), Error> {
    let failed = |e| Error::io("cannot write the command's output", e);
    if chunk.stream == v1::OutputStream::Stderr as i32 {
        let mut err = std::io::stderr().lock();
        err.write_all(&chunk.data)
            .and_then(|()| err.flush())
            .map_err(failed)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&chunk.data)
            .and_then(|()| out.flush())
            .map_err(failed)
    }
}

fn write_captured(result: &v1::CallToolResponse) -> Result<(), Error> {
    let structured = structured(result);
    let text = |key: &str| structured[key].as_str().unwrap_or_default().to_owned();
    let failed = |e| Error::io("cannot write the command's output", e);
    std::io::stdout()
        .write_all(text("stdout").as_bytes())
        .map_err(failed)?;
    std::io::stderr()
        .write_all(text("stderr").as_bytes())
        .map_err(failed)
}

fn structured(result: &v1::CallToolResponse) -> Json {
    result
        .structured_content
        .as_ref()
        .map_or(Json::Null, heist_proto::json::struct_to_json)
}

/// The command's exit code as ours.
pub fn exit_code(result: &v1::CallToolResponse) -> u8 {
    let s = structured(result);
    if s["timed_out"] == json!(true) {
        return EXIT_TIMED_OUT;
    }
    if let Some(signal) = s["signal"].as_u64() {
        return u8::try_from(128 + signal).unwrap_or(EXIT_ERROR);
    }
    match s["exit_code"].as_i64() {
        Some(code) => u8::try_from(code).unwrap_or(EXIT_ERROR),
        None if result.is_error => EXIT_ERROR,
        None => EXIT_OK,
    }
}

/// A line for stderr when the command did not end by itself, or its output was cut.
fn ending_note(result: &v1::CallToolResponse) -> Option<String> {
    let s = structured(result);
    let mut notes = Vec::new();
    if s["timed_out"] == json!(true) {
        notes.push(format!(
            "the command timed out after {} ms and was killed",
            s["duration_ms"]
        ));
    } else if let Some(signal) = s["signal"].as_u64() {
        notes.push(format!("the command was killed by signal {signal}"));
    }
    for stream in ["stdout", "stderr"] {
        if s[format!("{stream}_truncated")] == json!(true) {
            notes.push(format!(
                "{stream} was truncated at the worker's output quota"
            ));
        }
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(structured: Json, is_error: bool) -> v1::CallToolResponse {
        v1::CallToolResponse {
            structured_content: heist_proto::json::json_to_struct(&structured),
            is_error,
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_conventions() {
        assert_eq!(exit_code(&result(json!({"exit_code": 0}), false)), 0);
        assert_eq!(exit_code(&result(json!({"exit_code": 3}), true)), 3);
        assert_eq!(
            exit_code(&result(json!({"exit_code": null, "signal": 9}), true)),
            137
        );
        assert_eq!(
            exit_code(&result(json!({"signal": 9, "timed_out": true}), true)),
            EXIT_TIMED_OUT
        );
        assert_eq!(exit_code(&result(json!({}), true)), EXIT_ERROR);
    }

    #[test]
    fn notes_say_why_a_command_ended_early() {
        assert_eq!(ending_note(&result(json!({"exit_code": 0}), false)), None);
        let note = ending_note(&result(
            json!({"timed_out": true, "duration_ms": 1000, "stdout_truncated": true}),
            true,
        ))
        .expect("note");
        assert!(
            note.contains("timed out") && note.contains("stdout was truncated"),
            "{note}"
        );
    }
}
