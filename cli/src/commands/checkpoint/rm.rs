//! `heistctl checkpoint rm ID --yes [--request-id ID]`.

use crate::{
    cli::Context,
    commands::session::create::new_request_id,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

use super::human_bytes;

/// Flags of `checkpoint rm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint id.
    pub id: String,
    /// Confirm the deletion (required: it cannot be undone).
    #[arg(long)]
    pub yes: bool,
    /// Client request id (a fresh UUID when not given).
    #[arg(long, env = "HEIST_REQUEST_ID")]
    pub request_id: Option<String>,
}

/// Runs `checkpoint rm`. Without `--yes`: usage error (exit 2), nothing deleted.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    if !args.yes {
        return Err(Error::Usage(format!(
            "deleting checkpoint {} cannot be undone: add --yes",
            args.id
        )));
    }
    let request_id = args.request_id.unwrap_or_else(new_request_id);
    let freed = ctx
        .client()
        .await?
        .delete_checkpoint(&args.id, &request_id)
        .await?;
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(
            &mut out,
            &serde_json::json!({
                "id": args.id,
                "deleted": true,
                "freed_blobs": freed.freed_blobs,
                "freed_bytes": freed.freed_bytes,
            }),
        )?,
        Format::Table => output::write_text(
            &mut out,
            &format!(
                "deleted {} (freed {} blobs, {})\n",
                args.id,
                freed.freed_blobs,
                human_bytes(freed.freed_bytes)
            ),
        )?,
    }
    Ok(EXIT_OK)
}
