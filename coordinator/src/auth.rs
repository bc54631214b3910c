//! API clients and the client-credentials grant.
//!
//! Clients live in the `clients` tree with Argon2id-hashed secrets (PHC strings). The bootstrap
//! admin client comes from the configuration and is upserted at startup. [`Auth::issue_token`]
//! checks a client id and secret and signs a JWT with the coordinator's key. Secrets are never
//! logged; a wrong id and a wrong secret get the same answer after the same amount of work.

use std::{net::IpAddr, sync::Arc, time::Duration};

use argon2::{
    Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString,
};
use heist_proto::{
    errors, scopes,
    token::{TokenSigner, unix_now},
    v1::IssueTokenResponse,
};
use tokio::sync::Semaphore;
use tracing::{info, instrument, warn};

use crate::{error::Error, store::Store, throttle::LoginThrottle};

/// Checks the workers' join token in `x-heist-join-token` (WorkerControl, BlobService) without
/// leaking, through timing, how much of it matched (BLAKE3 hashes compare in constant time).
pub fn check_join_token(expected: &str, md: &tonic::metadata::MetadataMap) -> Result<(), Error> {
    let presented = md
        .get(heist_proto::metadata::JOIN_TOKEN)
        .and_then(|v| v.to_str().ok())
        .ok_or(Error::JoinTokenInvalid)?;
    if blake3::hash(presented.as_bytes()) == blake3::hash(expected.as_bytes()) {
        Ok(())
    } else {
        warn!("call refused: wrong join token");
        Err(Error::JoinTokenInvalid)
    }
}

/// Audience of every client token.
pub const CLIENT_AUDIENCE: &str = "heist";
/// Longest client secret looked at; longer ones are refused without hashing.
const MAX_SECRET_BYTES: usize = 4096;
/// Argon2 runs at most this many at once (it is deliberately slow and memory hungry).
const MAX_CONCURRENT_HASHES: usize = 4;

/// A registered API client, as stored in the `clients` tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientRecord {
    /// Client id (the token subject).
    #[prost(string, tag = "1")]
    pub id: String,
    /// Argon2id hash of the secret, as a PHC string.
    #[prost(string, tag = "2")]
    pub secret_hash: String,
    /// Scopes the client may put in its tokens.
    #[prost(string, repeated, tag = "3")]
    pub scopes: Vec<String>,
    /// When the record was written, seconds since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub updated_at_unix_s: u64,
}

/// Client store and token issuer.
pub struct Auth {
    store: Store,
    signer: Arc<TokenSigner>,
    issuer: String,
    ttl: Duration,
    /// Hash checked when the client id is unknown, so the answer takes as long as for a known id.
    decoy_hash: String,
    hashing: Semaphore,
    /// Failed-login back-off, checked before any hashing.
    throttle: LoginThrottle,
}

impl Auth {
    /// Loads the client store and upserts the bootstrap admin client.
    pub async fn new(
        store: Store,
        signer: Arc<TokenSigner>,
        issuer: String,
        ttl: Duration,
        admin_id: &str,
        admin_secret: &str,
    ) -> Result<Self, Error> {
        let decoy_hash = blocking(|| hash_secret("decoy secret that matches nothing")).await?;
        let auth = Self {
            store,
            signer,
            issuer,
            ttl,
            decoy_hash,
            hashing: Semaphore::new(MAX_CONCURRENT_HASHES),
            throttle: LoginThrottle::new(&crate::config::Config::default()),
        };
        auth.upsert_client(admin_id, admin_secret, &[scopes::ADMIN])
            .await?;
        Ok(auth)
    }

    /// Creates or updates a client. The secret is re-hashed only when it changed, so restarts
    /// with the same configuration do not rewrite the record.
    #[instrument(skip_all, fields(client_id = %id))]
    pub async fn upsert_client(
        &self,
        id: &str,
        secret: &str,
        scopes: &[&str],
    ) -> Result<(), Error> {
        let want_scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        let existing: Option<ClientRecord> =
            Store::get(&self.store.clients, id.as_bytes(), "client")?;
        if let Some(record) = &existing {
            let same_secret = {
                let (secret, hash) = (secret.to_owned(), record.secret_hash.clone());
                blocking(move || verify_secret(&secret, &hash)).await?
            };
            if same_secret && record.scopes == want_scopes {
                return Ok(());
            }
        }
        let secret_hash = {
            let secret = secret.to_owned();
            blocking(move || hash_secret(&secret)).await?
        };
        let record = ClientRecord {
            id: id.to_owned(),
            secret_hash,
            scopes: want_scopes,
            updated_at_unix_s: unix_now(),
        };
        Store::put(&self.store.clients, id.as_bytes(), &record)?;
        self.store.flush().await?;
        info!(
            created = existing.is_none(),
            scopes = %record.scopes.join(" "),
            "client stored"
        );
        Ok(())
    }

    /// The same store and issuer with `throttle` deciding which logins are heard.
    pub fn with_throttle(mut self, throttle: LoginThrottle) -> Self {
        self.throttle = throttle;
        self
    }

    /// IssueToken as a peer calls it: [`Auth::issue_token`] behind the failed-login throttle
    /// ([`crate::throttle`]). A throttled login is refused before its secret is looked at.
    pub async fn login(
        &self,
        peer: Option<IpAddr>,
        client_id: &str,
        client_secret: &str,
        requested: &[String],
    ) -> Result<IssueTokenResponse, Error> {
        if let Err(wait) = self.throttle.admit(client_id, peer) {
            warn!(
                client_id,
                ?peer,
                retry_after_ms = wait.as_millis(),
                "token refused: too many failed logins"
            );
            return Err(Error::LoginThrottled {
                retry_after_s: wait.as_secs().max(1),
            });
        }
        let result = self.issue_token(client_id, client_secret, requested).await;
        match &result {
            Ok(_) => self.throttle.succeeded(client_id, peer),
            Err(Error::BadClientCredentials) => self.throttle.failed(client_id, peer),
            Err(_) => {}
        }
        result
    }

    /// The client-credentials grant: a signed token for a client whose secret matches.
    #[instrument(skip_all, fields(client_id = %client_id))]
    pub async fn issue_token(
        &self,
        client_id: &str,
        client_secret: &str,
        requested: &[String],
    ) -> Result<IssueTokenResponse, Error> {
        if client_secret.len() > MAX_SECRET_BYTES {
            return Err(Error::BadClientCredentials);
        }
        let record: Option<ClientRecord> = if client_id.is_empty() {
            None
        } else {
            Store::get(&self.store.clients, client_id.as_bytes(), "client")?
        };
        let hash = record
            .as_ref()
            .map_or_else(|| self.decoy_hash.clone(), |r| r.secret_hash.clone());
        let matches = {
            let _permit = self
                .hashing
                .acquire()
                .await
                .map_err(|_| Error::ShuttingDown)?;
            let secret = client_secret.to_owned();
            blocking(move || verify_secret(&secret, &hash)).await?
        };
        let record = match record {
            Some(record) if matches => record,
            _ => {
                warn!("token refused: bad client credentials");
                return Err(Error::BadClientCredentials);
            }
        };
        let granted = resolve_scopes(&record.scopes, requested)?;
        let scope = granted.join(" ");
        let claims =
            TokenSigner::claims(&self.issuer, CLIENT_AUDIENCE, &record.id, &scope, self.ttl);
        let access_token = self.signer.sign(&claims).map_err(Error::Signing)?;
        info!(scopes = %scope, jti = %claims.jti, "token issued");
        Ok(IssueTokenResponse {
            access_token,
            token_type: "Bearer".to_owned(),
            expires_in_s: self.ttl.as_secs(),
            scopes: granted,
        })
    }
}

/// The scopes a token gets: all the client holds when none were asked for, else each asked-for
/// scope, which must be known and held.
fn resolve_scopes(held: &[String], requested: &[String]) -> Result<Vec<String>, Error> {
    if requested.is_empty() {
        return Ok(held.to_vec());
    }
    let held_claim = held.join(" ");
    let mut granted: Vec<String> = Vec::with_capacity(requested.len());
    for scope in requested {
        if !scopes::ALL.contains(&scope.as_str()) {
            return Err(Error::Status(errors::invalid_argument(
                "scopes",
                format!(
                    "unknown scope {scope:?}: use one of {}",
                    scopes::ALL.join(", ")
                ),
            )));
        }
        if !scopes::grants(&held_claim, scope) {
            return Err(Error::ScopeNotHeld(scope.clone()));
        }
        if !granted.contains(scope) {
            granted.push(scope.clone());
        }
    }
    Ok(granted)
}

/// Runs slow hashing work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await?
}

/// An Argon2id PHC string for `secret` with a fresh random salt.
fn hash_secret(secret: &str) -> Result<String, Error> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Error::SecretHash(format!("no randomness: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::SecretHash(e.to_string()))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| Error::SecretHash(e.to_string()))
}

/// Whether `secret` matches a PHC string (the algorithm and parameters come from the string).
fn verify_secret(secret: &str, phc: &str) -> Result<bool, Error> {
    let parsed = PasswordHash::new(phc).map_err(|e| Error::SecretHash(e.to_string()))?;
    Ok(Argon2::default()
        .verify_password(secret.as_bytes(), &parsed)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use heist_proto::token::TokenVerifier;

    use super::*;

    const SECRET: &str = "correct horse battery staple";

    async fn auth(dir: &std::path::Path) -> (Auth, Arc<TokenSigner>) {
        let store = Store::open(dir).expect("store");
        let signer = Arc::new(
            TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer"),
        );
        let auth = Auth::new(
            store,
            signer.clone(),
            "heist".to_owned(),
            Duration::from_secs(60),
            "admin",
            SECRET,
        )
        .await
        .expect("auth");
        (auth, signer)
    }

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let phc = hash_secret("s3cret").expect("hash");
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_secret("s3cret", &phc).expect("verify"));
        assert!(!verify_secret("other", &phc).expect("verify"));
    }

    #[tokio::test]
    async fn issues_verifiable_tokens_and_refuses_bad_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (auth, signer) = auth(dir.path()).await;
        let resp = auth.issue_token("admin", SECRET, &[]).await.expect("token");
        assert_eq!(resp.scopes, vec!["admin".to_owned()]);
        assert_eq!(resp.token_type, "Bearer");
        let verifier = TokenVerifier::new(&signer.public_key(), "heist", CLIENT_AUDIENCE);
        let claims = verifier.verify(&resp.access_token).expect("valid");
        assert_eq!(claims.sub, "admin");

        let wrong_secret = auth
            .issue_token("admin", "nope", &[])
            .await
            .expect_err("bad");
        let wrong_id = auth
            .issue_token("nobody", SECRET, &[])
            .await
            .expect_err("bad");
        let (a, b) = (
            tonic::Status::from(wrong_secret),
            tonic::Status::from(wrong_id),
        );
        assert_eq!(a.code(), tonic::Code::Unauthenticated);
        assert_eq!(a.message(), b.message());
    }

    #[tokio::test]
    async fn narrows_scopes_and_rejects_unknown_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (auth, _) = auth(dir.path()).await;
        let want = vec![scopes::TOOLS_CALL.to_owned()];
        let resp = auth
            .issue_token("admin", SECRET, &want)
            .await
            .expect("token");
        assert_eq!(resp.scopes, want);
        let err = auth
            .issue_token("admin", SECRET, &["root".to_owned()])
            .await
            .expect_err("unknown scope");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn scope_not_held_is_refused() {
        let held = vec![scopes::TOOLS_READ.to_owned()];
        let err = resolve_scopes(&held, &[scopes::TOOLS_CALL.to_owned()]).expect_err("not held");
        assert!(matches!(err, Error::ScopeNotHeld(_)));
    }

    #[test]
    fn the_call_scope_down_scopes_to_a_tool_category_and_not_back() {
        let call = vec![scopes::TOOLS_CALL.to_owned()];
        let fs = vec![scopes::TOOLS_FS.to_owned()];
        assert_eq!(resolve_scopes(&call, &fs).expect("narrower"), fs);
        let err = resolve_scopes(&fs, &call).expect_err("wider");
        assert!(matches!(err, Error::ScopeNotHeld(_)));
        let err = resolve_scopes(&fs, &[scopes::TOOLS_EXEC.to_owned()]).expect_err("other");
        assert!(matches!(err, Error::ScopeNotHeld(_)));
    }

    #[tokio::test]
    async fn bootstrap_rehashes_only_when_the_secret_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (auth, _) = auth(dir.path()).await;
        let before: ClientRecord = Store::get(&auth.store.clients, b"admin", "client")
            .expect("get")
            .expect("present");
        auth.upsert_client("admin", SECRET, &[scopes::ADMIN])
            .await
            .expect("same");
        let same: ClientRecord = Store::get(&auth.store.clients, b"admin", "client")
            .expect("get")
            .expect("present");
        assert_eq!(before.secret_hash, same.secret_hash);
        auth.upsert_client("admin", "a different secret!", &[scopes::ADMIN])
            .await
            .expect("changed");
        assert!(auth.issue_token("admin", SECRET, &[]).await.is_err());
        assert!(
            auth.issue_token("admin", "a different secret!", &[])
                .await
                .is_ok()
        );
    }
}
