//! `heistctl session create [--label k=v]... [--request-id ID]`.

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
        .create_session(labels, &request_id)
        .await?;
    super::print_one(ctx.format(), &session)?;
    Ok(EXIT_OK)
}

/// A fresh request id (UUIDv4).
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
