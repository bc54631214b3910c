//! `heistctl session show ID`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `session show`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub id: String,
}

/// Runs `session show`. Unknown id: exit 4.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let session = ctx.client().await?.get_session(&args.id).await?;
    super::print_one(ctx.format(), &session)?;
    Ok(EXIT_OK)
}
