//! `heistctl checkpoint create SESSION [--label k=v]... [--request-id ID]`.

use super::{human_bytes, progress::Progress};
use crate::{
    cli::{Context, parse_key_values},
    commands::session::create::new_request_id,
    error::{EXIT_OK, Error},
};

/// Flags of `checkpoint create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session to snapshot.
    pub session: String,
    /// Checkpoint label, `key=value` (repeatable).
    #[arg(
        long = "label",
        short = 'l',
        env = "HEIST_CHECKPOINT_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Client request id; retrying with the same id returns the same checkpoint. A fresh UUID
    /// when not given.
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `checkpoint create`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let labels = parse_key_values("--label", &args.labels)?;
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let client = ctx.client().await?;
    let progress = Progress::start(format!("capturing {}", args.session));
    let checkpoint = match client
        .create_checkpoint(&args.session, labels, &request_id)
        .await
    {
        Ok(c) => c,
        Err(err) => {
            progress.abandon();
            return Err(err);
        }
    };
    let stats = checkpoint.stats.unwrap_or_default();
    progress.finish(&format!(
        "checkpoint {}: {} files ({}), hashed {}, uploaded {} ({})",
        checkpoint.id,
        checkpoint.file_count,
        human_bytes(checkpoint.total_bytes),
        stats.hashed_files,
        stats.uploaded_blobs,
        human_bytes(stats.uploaded_bytes)
    ));
    super::print_one(ctx.format(), &checkpoint)?;
    Ok(EXIT_OK)
}
