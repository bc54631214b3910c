//! `heistctl tool ls [--session ID]`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format, ToolView},
};

/// Flags of `tool ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the tools of this session's worker.
    #[arg(long, short = 's', env = "HEIST_SESSION")]
    pub session: Option<String>,
}

/// Runs `tool ls`: a table, or a JSON array of tools with their input schemas.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let tools = ctx
        .client()
        .await?
        .list_tools(args.session.as_deref())
        .await?;
    print(ctx.format(), &tools)?;
    Ok(EXIT_OK)
}

/// Prints tools in the chosen format.
pub fn print(format: Format, tools: &[heist_proto::v1::ToolSpec]) -> Result<(), Error> {
    let views: Vec<ToolView> = tools.iter().map(ToolView::from).collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::write_json(&mut out, &views),
        Format::Table => output::write_text(&mut out, &output::tools_table(&views)),
    }
}
