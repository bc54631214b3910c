//! `heistctl transcript SESSION`: every event of every turn of a session, in order.

use crate::{
    cli::Context,
    commands::turn::render::Printer,
    error::{EXIT_OK, Error},
};

/// Flags of `transcript`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Session id.
    pub session: String,
}

/// Runs `transcript`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let events = ctx.client().await?.transcript(&args.session).await?;
    let mut printer = Printer::new(ctx.format());
    for event in &events {
        printer.print(event)?;
    }
    Ok(EXIT_OK)
}
