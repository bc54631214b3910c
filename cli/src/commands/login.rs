//! `heistctl login`: the client-credentials grant; the token is cached per coordinator URL.

use std::io::BufRead;

use serde::Serialize;

use crate::{
    cli::Context,
    credentials::CachedToken,
    error::{EXIT_OK, Error},
    output::{self, Format},
};

/// Flags of `login`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Client id (the bootstrap admin is HEIST_ADMIN_CLIENT_ID on the coordinator).
    #[arg(long, env = "HEIST_CLIENT_ID")]
    pub client_id: String,
    /// Client secret. Prefer --client-secret-stdin or the env var: flags show up in `ps`.
    #[arg(long, env = "HEIST_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Read the client secret from the first line of stdin (wins over --client-secret).
    #[arg(long, env = "HEIST_CLIENT_SECRET_STDIN")]
    pub client_secret_stdin: bool,
    /// Scopes to ask for (repeat or comma-separate); none means every scope the client holds.
    #[arg(long = "scope", env = "HEIST_SCOPES", value_delimiter = ',')]
    pub scopes: Vec<String>,
}

/// What `login --output json` prints.
#[derive(Debug, Serialize)]
struct LoginView<'a> {
    coordinator: &'a str,
    client_id: &'a str,
    expires_at: u64,
    scopes: &'a [String],
    credentials_file: String,
}

/// Runs `login`.
pub async fn run(ctx: &Context, args: Args) -> Result<u8, Error> {
    let secret = if args.client_secret_stdin {
        read_secret(std::io::stdin().lock())?
    } else {
        args.client_secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Usage(
                    "no client secret: pass --client-secret-stdin (or HEIST_CLIENT_SECRET)"
                        .to_owned(),
                )
            })?
    };
    let client = ctx.anonymous_client().await?;
    let response = client
        .issue_token(&args.client_id, &secret, args.scopes.clone())
        .await?;
    let store = ctx.store()?;
    let token = CachedToken {
        access_token: response.access_token,
        client_id: args.client_id.clone(),
        expires_at: heist_proto::token::unix_now().saturating_add(response.expires_in_s),
        scopes: response.scopes,
    };
    store.put(client.url(), token.clone())?;
    let mut out = std::io::stdout().lock();
    match ctx.format() {
        Format::Json => output::write_json(
            &mut out,
            &LoginView {
                coordinator: client.url(),
                client_id: &token.client_id,
                expires_at: token.expires_at,
                scopes: &token.scopes,
                credentials_file: store.path().display().to_string(),
            },
        )?,
        Format::Table => output::write_text(
            &mut out,
            &format!(
                "logged in to {} as {} (scopes: {}; expires in {} s; token cached in {})\n",
                client.url(),
                token.client_id,
                if token.scopes.is_empty() {
                    "-".to_owned()
                } else {
                    token.scopes.join(" ")
                },
                response.expires_in_s,
                store.path().display()
            ),
        )?,
    }
    Ok(EXIT_OK)
}

/// The first line of `input`, without its line ending.
fn read_secret(mut input: impl BufRead) -> Result<String, Error> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| Error::io("cannot read the client secret from stdin", e))?;
    let secret = line.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        return Err(Error::Usage(
            "--client-secret-stdin: stdin was empty; pipe the secret in, e.g. `heistctl login --client-id admin --client-secret-stdin < secret.txt`".to_owned(),
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_line_of_stdin() {
        assert_eq!(read_secret(&b"s3cret\nrest"[..]).expect("ok"), "s3cret");
        assert_eq!(read_secret(&b"s3cret\r\n"[..]).expect("ok"), "s3cret");
        assert_eq!(read_secret(&b" spaced "[..]).expect("ok"), " spaced ");
        assert!(read_secret(&b"\n"[..]).is_err());
        assert!(read_secret(&b""[..]).is_err());
    }
}
