//! `heistctl session create [--label k=v]... [--allow-tool NAME|GLOB]... [--request-id ID]`.

use crate::{
    cli::{Context, parse_key_values},
    error::{EXIT_OK, Error},
};

/// Flags of `session create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session label, `key=value` (repeatable). Only workers carrying every label are eligible.
    #[arg(
        long = "label",
        short = 'l',
        env = "HEIST_SESSION_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Only this tool may be called in the session (repeatable): a tool name (`calc`) or a
    /// glob (`fs.*`). Without it every tool the caller's token allows may be called. A fork
    /// keeps the policy.
    #[arg(long = "allow-tool", value_name = "NAME|GLOB")]
    pub allow_tools: Vec<String>,
    /// Client request id; retrying with the same id returns the same session. A fresh UUID is
    /// used when not given (so heistctl's own transport retries are safe).
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `session create`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let labels = parse_key_values("--label", &args.labels)?;
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let session = ctx
        .client()
        .await?
        .create_session_with(labels, args.allow_tools, &request_id)
        .await?;
    super::print_one(ctx.format(), &session)?;
    Ok(EXIT_OK)
}

/// A fresh request id (UUIDv4).
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
