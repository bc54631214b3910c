//! `heistctl admin client ls`.

use crate::{
    cli::Context,
    error::{EXIT_OK, Error},
    output::{self, Format, Table},
};

use super::ClientView;

/// Flags of `admin client ls` (none besides the global ones).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `admin client ls`: a table, or a JSON array of clients. Secrets are never listed.
pub async fn run(ctx: &Context, _args: Args) -> Result<u8, Error> {
    let clients: Vec<ClientView> = ctx
        .client()
        .await?
        .list_clients()
        .await?
        .into_iter()
        .map(ClientView::from)
        .collect();
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(&mut out, &clients)?,
        Format::Table => {
            let mut table = Table::new(&["ID", "STATE", "SCOPES", "CREATED", "UPDATED"]);
            for c in &clients {
                let state = match (c.state, c.bootstrap) {
                    (state, true) => format!("{state} (bootstrap)"),
                    (state, false) => state.to_owned(),
                };
                table.row(vec![
                    c.id.clone(),
                    state,
                    c.scopes.join(" "),
                    c.created_at.clone().unwrap_or_else(|| "-".to_owned()),
                    c.updated_at.clone().unwrap_or_else(|| "-".to_owned()),
                ]);
            }
            output::write_text(&mut out, &table.render())?;
        }
    }
    Ok(EXIT_OK)
}
