//! `heistctl run-python SESSION FILE|- [ARGS]...`: reads a local Python file (or stdin for `-`),
//! runs it in the session's sandbox with run.python, streams its output, and exits with its
//! exit code (see `exec`).

use serde_json::{Map, json};

use crate::{
    cli::Context,
    commands::{
        exec::{read_input, stream_tool},
        session::create::new_request_id,
    },
    error::Error,
};

/// Flags of `run-python`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub session: String,
    /// Local Python file to run, or `-` to read the program from stdin.
    pub file: String,
    /// Arguments for the program (`sys.argv[1:]`; put them after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// File whose content is the program's stdin (not with FILE `-`).
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<String>,
    /// The program's wall-clock timeout in seconds (default: the worker's).
    #[arg(long, value_name = "SECONDS")]
    pub timeout_s: Option<f64>,
    /// Client request id: a retry with the same id replays the first result.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `run-python`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    if args.file == "-" && args.stdin.as_deref() == Some("-") {
        return Err(Error::Usage(
            "the program is read from stdin (FILE is -), so --stdin cannot be - as well".to_owned(),
        ));
    }
    let code = read_input(&args.file)?;
    let mut arguments = Map::new();
    arguments.insert("code".to_owned(), json!(code));
    if !args.args.is_empty() {
        arguments.insert("args".to_owned(), json!(args.args));
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
        "run.python",
        arguments,
        &request_id,
        args.timeout_s,
    )
    .await
}
