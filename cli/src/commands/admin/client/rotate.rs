//! `heistctl admin client rotate ID`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `admin client rotate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The client whose secret to replace.
    pub id: String,
}

/// Runs `admin client rotate`: prints the new secret, once. The old secret and every token
/// issued with it are refused from now on.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let rotated = ctx.client().await?.rotate_client_secret(&args.id).await?;
    let client = rotated.client.unwrap_or_default().into();
    super::print_secret(ctx, "rotated the secret of", client, rotated.client_secret)?;
    Ok(EXIT_OK)
}
