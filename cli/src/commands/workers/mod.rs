//! `heistctl workers ls|show`.

pub mod ls;
pub mod show;

use crate::{cli::Context, error::Error};

/// Verbs of `workers`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List every worker the coordinator knows, live or not.
    #[command(alias = "list")]
    Ls(ls::Args),
    /// Show one worker.
    #[command(alias = "get")]
    Show(show::Args),
}

/// Runs a `workers` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Ls(args) => ls::run(ctx, args).await,
        Command::Show(args) => show::run(ctx, args).await,
    }
}
