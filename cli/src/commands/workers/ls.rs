//! `heistctl workers ls`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format, WorkerView},
};

/// Flags of `workers ls` (none besides the global ones).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `workers ls`: a table, or a JSON array of workers.
pub async fn run(ctx: &Context, _args: Args) -> Result<u8, Error> {
    let workers = ctx.client().await?.list_workers().await?;
    print(ctx.format(), &workers)?;
    Ok(EXIT_OK)
}

/// Prints workers in the chosen format.
pub fn print(format: Format, workers: &[heist_proto::v1::Worker]) -> Result<(), Error> {
    let views: Vec<WorkerView> = workers.iter().map(WorkerView::from).collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::write_json(&mut out, &views),
        Format::Table => output::write_text(&mut out, &output::workers_table(&views)),
    }
}
