//! `heistctl checkpoint restore ID [--session ID] [--request-id ID]`.

use super::progress::Progress;
use crate::{
    cli::Context,
    commands::session::{self, create::new_request_id},
    error::{EXIT_OK, Error},
};

/// Flags of `checkpoint restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint to restore.
    pub id: String,
    /// Session whose workspace is replaced (default: the checkpoint's own session).
    #[arg(long, short = 's')]
    pub session: Option<String>,
    /// Client request id (a fresh UUID when not given).
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `checkpoint restore`. A blob missing from the store fails (nothing is changed).
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let client = ctx.client().await?;
    let progress = Progress::start(format!("restoring {}", args.id));
    match client
        .restore_checkpoint(&args.id, args.session.as_deref(), &request_id)
        .await
    {
        Ok(restored) => {
            progress.finish(&format!("restored {} into {}", args.id, restored.id));
            session::print_one(ctx.format(), &restored)?;
            Ok(EXIT_OK)
        }
        Err(err) => {
            progress.abandon();
            Err(err)
        }
    }
}
