//! The command line: global flags, the noun/verb tree, and the context every verb runs with.

use std::{collections::BTreeMap, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    client::Client,
    commands::{
        admin, agents, audit, chat, checkpoint, completions, dev, exec, heist, login, logout, mcp,
        run_python, session, tool, transcript, turn, workers,
    },
    credentials::Store,
    error::Error,
    output::Format,
};

/// heistctl: drive a heist cluster (sessions, tools, workers) and run one locally.
#[derive(Debug, Parser)]
#[command(name = "heistctl", version = heist_proto::VERSION, propagate_version = true)]
pub struct Cli {
    /// Flags every command understands.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command understands.
#[derive(Clone, Debug, clap::Args)]
pub struct GlobalArgs {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "HEIST_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// PEM CA certificate that signed an https:// coordinator's certificate (default: the
    /// public web roots).
    #[arg(long, global = true, env = "HEIST_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Output format: `table` for people, `json` (stable) for programs.
    #[arg(
        long,
        short = 'o',
        global = true,
        env = "HEIST_OUTPUT",
        value_enum,
        default_value_t = Format::Table
    )]
    pub output: Format,
    /// Bearer token to use instead of the one cached by `heistctl login`.
    #[arg(long, global = true, env = "HEIST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline of each call to the coordinator, in seconds.
    #[arg(
        long,
        global = true,
        env = "HEIST_TIMEOUT",
        default_value_t = 30,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub timeout: u64,
    /// heistctl's own log filter (logs go to stderr), e.g. `info` or `heistctl=debug`.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "warn")]
    pub log_level: String,
    /// heistctl's log format: `text` or `json`.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Print the trace id of this command's calls on stderr (every call carries a W3C
    /// `traceparent`: TRACEPARENT's when set, so the command continues the caller's trace).
    #[arg(long, short = 'v', global = true, env = "HEIST_VERBOSE")]
    pub verbose: bool,
}

/// The noun/verb tree.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Get a token (client-credentials grant) and cache it for this coordinator.
    Login(login::Args),
    /// Forget the cached token for this coordinator.
    Logout(logout::Args),
    /// Registered workers.
    #[command(subcommand, alias = "worker")]
    Workers(workers::Command),
    /// Administration: API clients (admin scope).
    #[command(subcommand)]
    Admin(admin::Command),
    /// The coordinator's audit log: list, follow, verify (audit:read).
    #[command(subcommand)]
    Audit(audit::Command),
    /// Sessions: isolated workspaces placed on workers.
    #[command(subcommand, alias = "sessions")]
    Session(session::Command),
    /// Tools: list them and call them in a session.
    #[command(subcommand, alias = "tools")]
    Tool(tool::Command),
    /// Checkpoints: snapshot, list, show, restore and delete workspaces.
    #[command(subcommand, alias = "checkpoints")]
    Checkpoint(checkpoint::Command),
    /// Agents the workers host.
    #[command(subcommand, alias = "agent")]
    Agents(agents::Command),
    /// Run an agent turn in a session, streaming its events (`turn SESSION AGENT "message"`);
    /// or `turn watch TURN_ID` / `turn cancel TURN_ID`.
    Turn(turn::TurnArgs),
    /// A session's transcript: every event of every turn.
    Transcript(transcript::Args),
    /// Chat with an agent: each line you type is a turn, streamed.
    Chat(chat::Args),
    /// The heist: six agents plan a job, one is a mole, you catch it (`heist run --guess`).
    #[command(subcommand, alias = "game")]
    Heist(heist::Command),
    /// Run a command in a session's sandbox, streaming its output (`exec SESSION -- CMD...`);
    /// exits with the command's exit code.
    Exec(exec::Args),
    /// Run a local Python file (or `-` for stdin) in a session's sandbox, streaming its output;
    /// exits with its exit code.
    RunPython(run_python::Args),
    /// Print a shell completion script.
    Completions(completions::Args),
    /// Run a local cluster (coordinator + workers as child processes).
    #[command(subcommand)]
    Dev(dev::Command),
    /// Measure the cluster against baselines measured in the same run (`make bench`).
    Bench(crate::bench::Args),
    /// Serve MCP on stdin/stdout, forwarding to the coordinator's /mcp with your login (for
    /// desktop clients that launch a local process).
    Mcp(mcp::Args),
}

/// What a verb needs: the global flags, the token cache, and a way to connect.
#[derive(Clone, Debug)]
pub struct Context {
    /// Global flags.
    pub global: GlobalArgs,
}

impl Context {
    /// A context for these flags.
    pub fn new(global: GlobalArgs) -> Self {
        Self { global }
    }

    /// Output format.
    pub fn format(&self) -> Format {
        self.global.output
    }

    /// Per-call deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.global.timeout)
    }

    /// The token cache.
    pub fn store(&self) -> Result<Store, Error> {
        Store::default_location()
    }

    /// A connection without a token (login, health).
    pub async fn anonymous_client(&self) -> Result<Client, Error> {
        Client::connect_with(
            &self.global.coordinator,
            self.timeout(),
            self.global.ca_cert.as_deref(),
        )
        .await
    }

    /// A connection carrying the token: `--token`/HEIST_TOKEN, else the cached one. No token
    /// (or an expired cached one) fails before dialing, saying to run `heistctl login`.
    pub async fn client(&self) -> Result<Client, Error> {
        let token = self.token()?;
        Ok(self.anonymous_client().await?.with_token(token))
    }

    /// The token: `--token`/HEIST_TOKEN, else the cached one (an error saying to run
    /// `heistctl login` when there is none or it expired).
    pub fn token(&self) -> Result<String, Error> {
        let url = &self.global.coordinator;
        let token = match &self.global.token {
            Some(token) if !token.is_empty() => token.clone(),
            _ => {
                let cached = self
                    .store()?
                    .get(url)?
                    .ok_or_else(|| Error::NotLoggedIn { url: url.clone() })?;
                if cached.is_expired(heist_proto::token::unix_now()) {
                    return Err(Error::TokenExpired { url: url.clone() });
                }
                cached.access_token
            }
        };
        Ok(token)
    }
}

/// Parses repeated `key=value` flags into a map (later keys win).
pub fn parse_key_values(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>, Error> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(Error::Usage(format!(
                "{flag} {pair:?} is not key=value (e.g. {flag} team=red)"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_values_need_a_key() {
        let m =
            parse_key_values("--label", &["a=1".into(), "b=x=y".into(), "a=2".into()]).expect("ok");
        assert_eq!(m.get("a").map(String::as_str), Some("2"));
        assert_eq!(m.get("b").map(String::as_str), Some("x=y"));
        assert!(parse_key_values("--label", &["=1".into()]).is_err());
        assert!(parse_key_values("--label", &["noequals".into()]).is_err());
    }
}
