//! `heistctl turn watch TURN_ID [--from N]`: replays a turn's events from N, then follows it.

use crate::{cli::Context, commands::turn::run::follow, error::Error};

/// Flags of `turn watch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Turn id (printed when the turn started).
    pub turn: String,
    /// First event number to show.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
}

/// Runs `turn watch`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let events = ctx
        .client()
        .await?
        .watch_turn(&args.turn, args.from)
        .await?;
    follow(ctx, events).await
}
