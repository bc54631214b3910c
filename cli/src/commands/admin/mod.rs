//! `heistctl admin ...`: administration of the cluster (needs the admin scope).

pub mod client;
pub mod keys;

use crate::{cli::Context, error::Error};

/// Nouns of `admin`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// API clients: create, list, rotate a secret, revoke.
    #[command(subcommand, alias = "clients")]
    Client(client::Command),
    /// The coordinator's token signing keys: rotate.
    #[command(subcommand, alias = "key")]
    Keys(keys::Command),
}

/// Runs an `admin` command.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Client(cmd) => client::run(ctx, cmd).await,
        Command::Keys(cmd) => keys::run(ctx, cmd).await,
    }
}
