//! `heistctl agents ls [--session ID]`.

use serde_json::json;

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format, Table},
};

/// Flags of `agents ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the agents of this session's worker.
    #[arg(long, short = 's', env = "HEIST_SESSION")]
    pub session: Option<String>,
}

/// Runs `agents ls`: a table, or a JSON array of agents.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let agents = ctx
        .client()
        .await?
        .list_agents(args.session.as_deref())
        .await?;
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => {
            let views: Vec<_> = agents
                .iter()
                .map(|a| {
                    json!({
                        "name": a.name,
                        "role": a.role,
                        "model": a.model,
                        "tools": a.tools,
                        "step_limit": a.step_limit,
                    })
                })
                .collect();
            output::write_json(&mut out, &views)?;
        }
        Format::Table => {
            let mut table = Table::new(&["NAME", "MODEL", "STEPS", "TOOLS", "ROLE"]);
            for a in &agents {
                table.row(vec![
                    a.name.clone(),
                    a.model.clone(),
                    a.step_limit.to_string(),
                    a.tools.join(","),
                    a.role.clone(),
                ]);
            }
            output::write_text(&mut out, &table.render())?;
        }
    }
    Ok(EXIT_OK)
}
