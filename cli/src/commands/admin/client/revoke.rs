//! `heistctl admin client revoke ID --yes`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

use super::ClientView;

/// Flags of `admin client revoke`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The client to revoke.
    pub id: String,
    /// Confirm the revocation (required: it cannot be undone, and the id is never reused).
    #[arg(long)]
    pub yes: bool,
}

/// Runs `admin client revoke`. Without `--yes`: usage error (exit 2), nothing revoked.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    if !args.yes {
        return Err(Error::Usage(format!(
            "revoking client {} cannot be undone (its tokens stop working at once, and the id \
             is never reused): add --yes",
            args.id
        )));
    }
    let revoked = ctx.client().await?.revoke_client(&args.id).await?;
    let client = ClientView::from(revoked.client.unwrap_or_default());
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(
            &mut out,
            &serde_json::json!({
                "client": client,
                "already_revoked": revoked.already_revoked,
            }),
        )?,
        Format::Table if revoked.already_revoked => output::write_text(
            &mut out,
            &format!("client {} was already revoked\n", client.id),
        )?,
        Format::Table => output::write_text(
            &mut out,
            &format!(
                "revoked client {}: it gets no tokens, and its tokens are refused\n",
                client.id
            ),
        )?,
    }
    Ok(EXIT_OK)
}
