//! `heistctl logout`: forget the cached token for this coordinator.

use serde::Serialize;

use crate::{
    cli::Context,
    credentials::normalize_url,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

/// Flags of `logout` (none besides the global ones).
#[derive(Debug, clap::Args)]
pub struct Args {}

#[derive(Debug, Serialize)]
struct LogoutView<'a> {
    coordinator: &'a str,
    removed: bool,
}

/// Runs `logout`. Not being logged in is not an error.
pub fn run(ctx: &Context, _args: Args) -> Result<u8, Error> {
    let url = normalize_url(&ctx.global.coordinator);
    let removed = ctx.store()?.remove(&url)?;
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(
            &mut out,
            &LogoutView {
                coordinator: &url,
                removed,
            },
        )?,
        Format::Table if removed => {
            output::write_text(&mut out, &format!("logged out of {url}\n"))?;
        }
        Format::Table => output::write_text(&mut out, &format!("not logged in to {url}\n"))?,
    }
    Ok(EXIT_OK)
}
