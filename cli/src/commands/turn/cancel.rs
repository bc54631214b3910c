//! `heistctl turn cancel TURN_ID`.

use serde_json::json;

use crate::{
    cli::Context,
    commands::turn::render::state_name,
    error::{EXIT_OK, Error},
    output::{Format, write_json, write_text},
};

/// Flags of `turn cancel`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Turn id.
    pub turn: String,
}

/// Runs `turn cancel`: the turn as it was when cancelled.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let turn = ctx.client().await?.cancel_turn(&args.turn).await?;
    let mut out = std::io::stdout().lock();
    let running = turn.state == heist_proto::v1::TurnState::Running as i32;
    match ctx.format() {
        Format::Json => write_json(
            &mut out,
            &json!({"id": turn.id, "session_id": turn.session_id, "agent": turn.agent,
                    "state": state_name(turn.state), "cancelled": running}),
        )?,
        Format::Table if running => write_text(&mut out, &format!("cancelling {}\n", turn.id))?,
        Format::Table => write_text(
            &mut out,
            &format!("{} already ended ({})\n", turn.id, state_name(turn.state)),
        )?,
    }
    Ok(EXIT_OK)
}
