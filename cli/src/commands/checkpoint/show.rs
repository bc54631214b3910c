//! `heistctl checkpoint show ID [--manifest]`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `checkpoint show`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint id.
    pub id: String,
    /// Also list every file, directory and symlink.
    #[arg(long)]
    pub manifest: bool,
}

/// Runs `checkpoint show`. Unknown id: exit 4.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let checkpoint = ctx
        .client()
        .await?
        .get_checkpoint(&args.id, args.manifest)
        .await?;
    super::print_one(ctx.format(), &checkpoint)?;
    Ok(EXIT_OK)
}
