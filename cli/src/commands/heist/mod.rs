//! `heistctl heist run|watch|fork|analyze|guess|ls|show|stats`: the flagship game.
//!
//! Six agents (intel, lookout, hacker, safecracker, driver, planner) plan a job against a target
//! generated from a seed; one of them is secretly a mole. Watch the rounds live, read the
//! analysis, make a guess, learn the truth. Outcomes: SUCCESS (you caught the mole and the final
//! plan holds up against the target's database), FAILURE (you caught the mole, but its sabotage
//! made it into the plan), BUSTED (you accused the wrong crew member: the mole tips off the
//! police).

mod render;

use std::io::IsTerminal as _;

use futures::StreamExt as _;
use heist_proto::v1;

use crate::{
    cli::Context,
    client::Client,
    error::{EXIT_OK, Error},
    output::Format,
};

pub use render::Painter;

/// Verbs of `heist`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a game and watch it live; with --guess, end it with the analyzer's pick.
    Run(RunArgs),
    /// Re-attach to a game (from an event number) and follow it live.
    Watch(WatchArgs),
    /// Replay a game's whole story.
    Show(GameArg),
    /// Start a new game from a game's checkpoint after a round ("what if the crew had…").
    Fork(ForkArgs),
    /// Who behaved suspiciously, and the evidence.
    Analyze(GameArg),
    /// Accuse a crew member; then the outcome and the reveal.
    ///
    /// Outcomes: SUCCESS when you caught the mole and the final plan holds up against the
    /// target's database; FAILURE when you caught the mole but its sabotage made it into the
    /// final plan (the job falls apart, nobody is arrested); BUSTED when you accused the wrong
    /// crew member (the mole tips off the police).
    Guess(GuessArgs),
    /// Your games, newest first.
    #[command(alias = "list")]
    Ls,
    /// Statistics over your games.
    Stats,
}

/// Flags of `heist run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Target seed: the same seed gives the same target and the same mole (default: random).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rounds to play (1-10).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Model chain for the crew (default: the workers' default, the scripted model).
    #[arg(long, default_value = "")]
    pub model: String,
    /// After the rounds, print the analysis and accuse its top suspect.
    #[arg(long)]
    pub guess: bool,
}

/// Flags of `heist watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Game id.
    pub game: String,
    /// First event number to show.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
}

/// A game id.
#[derive(Debug, clap::Args)]
pub struct GameArg {
    /// Game id.
    pub game: String,
}

/// Flags of `heist fork`.
#[derive(Debug, clap::Args)]
pub struct ForkArgs {
    /// Game id.
    pub game: String,
    /// Fork after this round.
    #[arg(long)]
    pub round: u32,
    /// Model chain for the rounds after the fork.
    #[arg(long, default_value = "")]
    pub model: String,
    /// A note from you to the crew, added to their messages after the fork.
    #[arg(long, default_value = "")]
    pub note: String,
}

/// Flags of `heist guess`.
#[derive(Debug, clap::Args)]
pub struct GuessArgs {
    /// Game id.
    pub game: String,
    /// The crew member you accuse.
    pub agent: String,
}

/// Runs a `heist` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    let client = ctx.client().await?;
    let painter = Painter::new(ctx.format(), std::io::stdout().is_terminal());
    match cmd {
        Command::Run(args) => {
            let events = client
                .start_heist(v1::StartHeistRequest {
                    seed: args.seed,
                    rounds: args.rounds,
                    model: args.model,
                    request_id: format!("r-{}", uuid::Uuid::now_v7()),
                })
                .await?;
            let game = follow(&painter, events).await?;
            if args.guess
                && let Some(game) = game.filter(|g| g.state == v1::HeistState::AwaitingGuess as i32)
            {
                guess_top_suspect(&client, &painter, &game.id).await?;
            }
        }
        Command::Watch(args) => {
            follow(&painter, client.watch_heist(&args.game, args.from).await?).await?;
        }
        Command::Show(args) => {
            follow(&painter, client.watch_heist(&args.game, 1).await?).await?;
        }
        Command::Fork(args) => {
            let events = client
                .fork_heist(v1::ForkHeistRequest {
                    game_id: args.game,
                    round: args.round,
                    model: args.model,
                    note: args.note,
                    request_id: format!("r-{}", uuid::Uuid::now_v7()),
                })
                .await?;
            follow(&painter, events).await?;
        }
        Command::Analyze(args) => painter.analysis(&client.analyze_heist(&args.game).await?),
        Command::Guess(args) => painter.reveal(&client.guess_heist(&args.game, &args.agent).await?),
        Command::Ls => painter.games(&client.list_heists().await?),
        Command::Stats => painter.stats(&client.heist_stats().await?),
    }
    Ok(EXIT_OK)
}

/// Prints a game's events until it finishes; the final summary.
pub async fn follow(
    painter: &Painter,
    mut events: crate::client::HeistEvents,
) -> Result<Option<v1::Heist>, Error> {
    let mut last = None;
    while let Some(event) = events.next().await {
        let event = event?;
        if let Some(v1::heist_event::Event::Finished(game)) = &event.event {
            last = Some(game.clone());
        }
        painter.event(&event);
    }
    Ok(last)
}

/// Analyzes a finished game, prints it, accuses the top suspect, prints the reveal.
pub async fn guess_top_suspect(
    client: &Client,
    painter: &Painter,
    game: &str,
) -> Result<v1::GuessResult, Error> {
    let analysis = client.analyze_heist(game).await?;
    painter.analysis(&analysis);
    let pick = analysis
        .suspects
        .first()
        .map(|s| s.agent.clone())
        .unwrap_or_else(|| "planner".to_owned());
    let result = client.guess_heist(game, &pick).await?;
    painter.reveal(&result);
    Ok(result)
}

/// Whether output is JSON lines.
fn is_json(format: Format) -> bool {
    matches!(format, Format::Json)
}
