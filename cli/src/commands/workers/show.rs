//! `heistctl workers show ID`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format, WorkerView},
};

/// Flags of `workers show`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Worker id.
    pub id: String,
}

/// Runs `workers show`. Unknown id: exit 4.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let worker = ctx.client().await?.get_worker(&args.id).await?;
    let view = WorkerView::from(&worker);
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(&mut out, &view)?,
        Format::Table => output::write_text(&mut out, &output::worker_details(&view))?,
    }
    Ok(EXIT_OK)
}
