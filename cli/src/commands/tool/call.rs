//! `heistctl tool call SESSION TOOL [--arg k=v ...] [--json '{...}'] [--request-id ID]`.
//!
//! `--json` is the whole arguments object; each `--arg key=value` then sets one key. A value
//! that parses as JSON (`3`, `true`, `null`, `"quoted"`, `[1,2]`, `{"a":1}`) is used as that
//! JSON value; anything else is a plain string (`--arg path=notes.txt`).

use serde_json::{Map, Value as Json};

use crate::{
    cli::Context,
    commands::session::create::new_request_id,
    error::{EXIT_OK, EXIT_TOOL_ERROR, Error},
    output::{self, CallResultView, Format},
};

/// Flags of `tool call`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub session: String,
    /// Tool name, e.g. `fs.read`.
    pub tool: String,
    /// Argument `key=value` (repeatable); overrides the same key from --json.
    #[arg(
        long = "arg",
        short = 'a',
        value_name = "KEY=VALUE",
        env = "HEIST_TOOL_ARG"
    )]
    pub args: Vec<String>,
    /// The whole arguments object as JSON.
    #[arg(long, value_name = "JSON", env = "HEIST_TOOL_JSON")]
    pub json: Option<String>,
    /// Client request id: a retry with the same id returns the first result without running
    /// the tool again. A fresh UUID when not given.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `tool call`. Exit 6 when the result has `is_error`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let arguments = build_arguments(args.json.as_deref(), &args.args)?;
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let response = ctx
        .client()
        .await?
        .call_tool(
            &args.session,
            &args.tool,
            heist_proto::json::map_to_struct(&arguments),
            &request_id,
        )
        .await?;
    let view = CallResultView::from(&response);
    print(ctx.format(), &view)?;
    Ok(if view.is_error {
        EXIT_TOOL_ERROR
    } else {
        EXIT_OK
    })
}

/// Prints a tool result: the JSON view, or text blocks as-is and JSON blocks pretty-printed
/// (a tool error is also flagged on stderr).
pub fn print(format: Format, view: &CallResultView) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::write_json(&mut out, view),
        Format::Table => {
            if view.is_error {
                eprintln!("the tool reported an error:");
            }
            output::write_text(&mut out, &view.text())
        }
    }
}

/// The arguments object from `--json` and `--arg` flags.
pub fn build_arguments(json: Option<&str>, pairs: &[String]) -> Result<Map<String, Json>, Error> {
    let mut arguments = match json {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Json>(text) {
            Ok(Json::Object(map)) => map,
            Ok(_) => {
                return Err(Error::Usage(
                    "--json must be a JSON object, e.g. --json '{\"path\": \"notes.txt\"}'"
                        .to_owned(),
                ));
            }
            Err(e) => return Err(Error::Usage(format!("--json is not valid JSON: {e}"))),
        },
    };
    for pair in pairs {
        let (key, raw) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--arg {pair:?} is not key=value (e.g. --arg path=notes.txt or --arg n=3)"
                ))
            })?;
        arguments.insert(key.to_owned(), parse_value(raw));
    }
    Ok(arguments)
}

/// A `--arg` value: JSON when it parses as JSON, else the plain string.
pub fn parse_value(raw: &str) -> Json {
    serde_json::from_str(raw).unwrap_or_else(|_| Json::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn arg_values_are_json_when_they_parse() {
        assert_eq!(parse_value("3"), json!(3));
        assert_eq!(parse_value("-2.5"), json!(-2.5));
        assert_eq!(parse_value("true"), json!(true));
        assert_eq!(parse_value("null"), json!(null));
        assert_eq!(parse_value("\"42\""), json!("42"));
        assert_eq!(parse_value("[1,\"a\"]"), json!([1, "a"]));
        assert_eq!(parse_value("notes.txt"), json!("notes.txt"));
        assert_eq!(parse_value("2*(3+4)^2"), json!("2*(3+4)^2"));
        assert_eq!(parse_value("007"), json!("007"));
        assert_eq!(parse_value(""), json!(""));
        assert_eq!(parse_value("hello world"), json!("hello world"));
    }

    #[test]
    fn args_override_json_keys() {
        let args = build_arguments(
            Some(r#"{"path": "a.txt", "append": false}"#),
            &["append=true".into(), "content=x=y".into()],
        )
        .expect("ok");
        assert_eq!(
            Json::Object(args),
            json!({"path": "a.txt", "append": true, "content": "x=y"})
        );
    }

    #[test]
    fn malformed_flags_are_usage_errors() {
        for (json, pairs) in [
            (Some("[1]"), vec![]),
            (Some("{oops"), vec![]),
            (None, vec!["novalue".to_owned()]),
            (None, vec!["=3".to_owned()]),
        ] {
            let err = build_arguments(json, &pairs).expect_err("usage");
            assert_eq!(err.exit_code(), crate::error::EXIT_USAGE, "{err}");
        }
    }
}
