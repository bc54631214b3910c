//! `heistctl session ls [--all] [--page-size N]`: follows every page.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `session ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Include closed sessions.
    #[arg(long, short = 'a', env = "HEIST_LIST_ALL")]
    pub all: bool,
    /// Sessions per page requested from the coordinator (all pages are fetched); 0 = server default.
    #[arg(long, env = "HEIST_PAGE_SIZE", default_value_t = 0)]
    pub page_size: u32,
}

/// Runs `session ls`: a table, or a JSON array of sessions.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let sessions = ctx
        .client()
        .await?
        .list_sessions(args.all, args.page_size)
        .await?;
    super::print_many(ctx.format(), &sessions)?;
    Ok(EXIT_OK)
}
