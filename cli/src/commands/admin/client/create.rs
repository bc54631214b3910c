//! `heistctl admin client create ID --scope S [--scope S ...]`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `admin client create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new client's id (1 to 128 characters from A-Z a-z 0-9 . _ : -).
    pub id: String,
    /// A scope its tokens may carry; repeat for more (e.g. --scope sessions:read --scope
    /// sessions:write). `admin` grants everything.
    #[arg(long = "scope", required = true, value_name = "SCOPE")]
    pub scopes: Vec<String>,
}

/// Runs `admin client create`: prints the client and its secret, once.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let created = ctx
        .client()
        .await?
        .create_client(&args.id, args.scopes)
        .await?;
    let client = created.client.unwrap_or_default().into();
    super::print_secret(ctx, "created", client, created.client_secret)?;
    Ok(EXIT_OK)
}
