//! `heistctl tool ls|call`.

pub mod call;
pub mod ls;

use crate::{cli::Context, error::Error};

/// Verbs of `tool`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List tools (merged across workers, or those of one session's worker).
    #[command(alias = "list")]
    Ls(ls::Args),
    /// Call a tool in a session. Exit 6 when the tool reports an error.
    Call(call::Args),
}

/// Runs a `tool` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Ls(args) => ls::run(ctx, args).await,
        Command::Call(args) => call::run(ctx, args).await,
    }
}
