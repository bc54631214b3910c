//! `heistctl admin keys rotate`: the coordinator's token signing keys (ClientService, admin
//! scope). The public keys are at `GET /.well-known/jwks.json`.

pub mod rotate;

use crate::{cli::Context, error::Error};

/// Verbs of `admin keys`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a fresh key the signing key; tokens signed by the old one work until they expire.
    Rotate(rotate::Args),
}

/// Runs an `admin keys` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Rotate(args) => rotate::run(ctx, args).await,
    }
}
