//! `heistctl session fork CHECKPOINT [--label k=v]... [--request-id ID]`: a new session with a
//! checkpoint's content, placed by the normal rules (a worker holding the blobs is preferred).

use crate::{
    cli::{Context, parse_key_values},
    commands::checkpoint::progress::Progress,
    error::{EXIT_OK, Error},
};

/// Flags of `session fork`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint to start from.
    pub checkpoint: String,
    /// Label of the new session, `key=value` (repeatable); only workers carrying every label
    /// are eligible.
    #[arg(
        long = "label",
        short = 'l',
        env = "HEIST_SESSION_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Client request id; retrying with the same id returns the same session. A fresh UUID
    /// when not given.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `session fork`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let labels = parse_key_values("--label", &args.labels)?;
    let request_id = args
        .request_id
        .unwrap_or_else(super::create::new_request_id);
    let client = ctx.client().await?;
    let progress = Progress::start(format!("forking {}", args.checkpoint));
    match client
        .fork_session(&args.checkpoint, labels, &request_id)
        .await
    {
        Ok(session) => {
            progress.finish(&format!(
                "forked {} into {} on {}",
                args.checkpoint, session.id, session.worker_id
            ));
            super::print_one(ctx.format(), &session)?;
            Ok(EXIT_OK)
        }
        Err(err) => {
            progress.abandon();
            Err(err)
        }
    }
}
