//! `heistctl session close ID`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
};

/// Flags of `session close`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub id: String,
    /// Client request id (a fresh UUID when not given).
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `session close`: prints the closed session. Closing a closed session is not an error.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let request_id = args
        .request_id
        .unwrap_or_else(super::create::new_request_id);
    let session = ctx
        .client()
        .await?
        .close_session(&args.id, &request_id)
        .await?;
    super::print_one(ctx.format(), &session)?;
    Ok(EXIT_OK)
}
