//! `heistctl admin keys rotate`.

use serde::Serialize;

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

/// Flags of `admin keys rotate`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// What a rotation did, as printed (`--output json`).
#[derive(Debug, Serialize)]
struct RotationView {
    /// `kid` of the new signing key.
    key_id: String,
    /// `kid` of the key it replaced.
    retired_key_id: String,
    /// RFC 3339: until when the retired key's tokens are accepted.
    retired_accepted_until: Option<String>,
    /// Retired keys dropped (everything they signed had expired).
    dropped_key_ids: Vec<String>,
}

/// Runs `admin keys rotate`: prints the new and the retired key ids.
pub async fn run(ctx: &Context, _args: Args) -> Result<u8, Error> {
    let r = ctx.client().await?.rotate_signing_key().await?;
    let view = RotationView {
        key_id: r.key_id,
        retired_key_id: r.retired_key_id,
        retired_accepted_until: r.retired_accepted_until.map(|t| t.to_string()),
        dropped_key_ids: r.dropped_key_ids,
    };
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(&mut out, &view)?,
        Format::Table => output::write_text(
            &mut out,
            &format!(
                "signing key rotated: new kid {}\nretired kid {} (its tokens are accepted until \
                 {})\n",
                view.key_id,
                view.retired_key_id,
                view.retired_accepted_until.as_deref().unwrap_or("-"),
            ),
        )?,
    }
    Ok(EXIT_OK)
}
