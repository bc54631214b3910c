//! `heistctl admin client create|ls|rotate|revoke`: API clients (ClientService, admin scope).
//! A secret is printed once, by `create` and `rotate`; the coordinator keeps only its hash.

pub mod create;
pub mod ls;
pub mod revoke;
pub mod rotate;

use heist_proto::v1;
use serde::Serialize;

use crate::{
    cli::Context,
    error::Error,
    output::{self, Format},
};

/// Verbs of `admin client`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Register a client with a fresh secret (printed once).
    Create(create::Args),
    /// Every client, without secrets.
    #[command(alias = "list")]
    Ls(ls::Args),
    /// Give a client a new secret (printed once); its old secret and tokens stop working.
    Rotate(rotate::Args),
    /// Revoke a client for good: no more tokens, its tokens are refused at once.
    Revoke(revoke::Args),
}

/// Runs an `admin client` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Create(args) => create::run(ctx, args).await,
        Command::Ls(args) => ls::run(ctx, args).await,
        Command::Rotate(args) => rotate::run(ctx, args).await,
        Command::Revoke(args) => revoke::run(ctx, args).await,
    }
}

/// A client as printed (`--output json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientView {
    /// Client id.
    pub id: String,
    /// Scopes its tokens may carry.
    pub scopes: Vec<String>,
    /// `active` or `revoked`.
    pub state: &'static str,
    /// Whether it is the bootstrap admin (HEIST_ADMIN_CLIENT_ID).
    pub bootstrap: bool,
    /// RFC 3339, or null for clients stored before creation times were kept.
    pub created_at: Option<String>,
    /// RFC 3339.
    pub updated_at: Option<String>,
    /// RFC 3339, or null.
    pub revoked_at: Option<String>,
}

impl From<v1::ApiClient> for ClientView {
    fn from(c: v1::ApiClient) -> Self {
        Self {
            state: if c.revoked { "revoked" } else { "active" },
            bootstrap: c.bootstrap,
            created_at: c.created_at.map(|t| t.to_string()),
            updated_at: c.updated_at.map(|t| t.to_string()),
            revoked_at: c.revoked_at.map(|t| t.to_string()),
            scopes: c.scopes,
            id: c.id,
        }
    }
}

/// A client and the secret just made for it (`create`, `rotate`).
#[derive(Debug, Serialize)]
struct WithSecret {
    #[serde(flatten)]
    client: ClientView,
    client_secret: String,
}

/// Prints a client with its new secret, and says (on stderr in JSON mode, so stdout stays
/// JSON) that the secret is not shown again.
fn print_secret(
    ctx: &Context,
    what: &str,
    client: ClientView,
    secret: String,
) -> Result<(), Error> {
    let notice = format!(
        "this secret is not shown again: store it now (log in with `heistctl login --client-id \
         {} --client-secret-stdin`)",
        client.id
    );
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => {
            output::write_json(
                &mut out,
                &WithSecret {
                    client,
                    client_secret: secret,
                },
            )?;
            eprintln!("{notice}");
            Ok(())
        }
        Format::Table => output::write_text(
            &mut out,
            &format!(
                "{what} client {} (scopes: {})\nclient secret: {secret}\n{notice}\n",
                client.id,
                client.scopes.join(" ")
            ),
        ),
    }
}
