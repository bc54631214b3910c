//! `heistctl turn SESSION AGENT "message"`, `turn watch TURN_ID [--from N]`,
//! `turn cancel TURN_ID`; [`render`] prints events (shared with `chat` and `transcript`).

pub mod cancel;
pub mod render;
pub mod run;
pub mod watch;

use crate::{cli::Context, error::Error};

/// `turn`: run a turn, or one of its verbs.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TurnArgs {
    /// A verb on an existing turn.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Run a new turn.
    #[command(flatten)]
    pub run: run::Args,
}

/// Verbs on an existing turn.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Re-attach to a turn: replay its events from `--from`, then follow it live.
    Watch(watch::Args),
    /// Stop a running turn, including the command it runs.
    Cancel(cancel::Args),
}

/// Runs `turn`.
pub async fn run(ctx: &Context, args: TurnArgs) -> Result<u8, Error> {
    match args.command {
        Some(Command::Watch(a)) => watch::run(ctx, a).await,
        Some(Command::Cancel(a)) => cancel::run(ctx, a).await,
        None => run::run(ctx, args.run).await,
    }
}
