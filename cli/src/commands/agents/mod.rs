//! `heistctl agents ls`.

pub mod ls;

use crate::{cli::Context, error::Error};

/// Verbs of `agents`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List agents (merged across workers, or those of one session's worker).
    #[command(alias = "list")]
    Ls(ls::Args),
}

/// Runs an `agents` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Ls(args) => ls::run(ctx, args).await,
    }
}
