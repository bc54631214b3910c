//! `heistctl checkpoint ls [--session ID]`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `checkpoint ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this session's checkpoints.
    #[arg(long, short = 's', env = "HEIST_SESSION")]
    pub session: Option<String>,
}

/// Runs `checkpoint ls`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let checkpoints = ctx
        .client()
        .await?
        .list_checkpoints(args.session.as_deref())
        .await?;
    super::print_many(ctx.format(), &checkpoints)?;
    Ok(EXIT_OK)
}
