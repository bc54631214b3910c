//! API clients and the client-credentials grant.
//!
//! Clients live in the `clients` tree with Argon2id-hashed secrets (PHC strings). The bootstrap
//! admin client comes from the configuration and is upserted at startup; administrators
//! create, rotate and revoke the others ([`Auth::create_client`], [`Auth::rotate_secret`],
//! [`Auth::revoke_client`]). [`Auth::issue_token`] checks a client id and secret and signs a
//! JWT with the coordinator's key. Secrets are never logged; a wrong id and a wrong secret get
//! the same answer after the same amount of work.
//!
//! Revocation and rotation take effect on the next call: [`ClientStates`] holds each client's
//! secret generation and revoked flag in memory (loaded at start, updated by every change), and
//! the auth layer checks every token against it ([`ClientStates::check`]).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use argon2::{
    Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString,
};
use heist_proto::{
    errors,
    ids::ClientId,
    scopes,
    token::{Claims, TokenSigner, unix_now},
    v1::IssueTokenResponse,
};
use tokio::sync::Semaphore;
use tracing::{info, instrument, warn};

use crate::{error::Error, signing_keys::SigningKeys, store::Store, throttle::LoginThrottle};

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
/// Random bytes in a generated client secret (256 bits, sent as 64 hex characters).
const SECRET_BYTES: usize = 32;

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
    /// When the client was created, seconds since the Unix epoch (0: stored before this field).
    #[prost(uint64, tag = "5")]
    pub created_at_unix_s: u64,
    /// Secret generation: starts at 0, one more at each rotation. Tokens carry the generation
    /// they were issued under (`gen` claim) and are refused once it is not the current one.
    #[prost(uint64, tag = "6")]
    pub generation: u64,
    /// Revoked for good: no tokens, and every token it holds is refused. Kept (never deleted)
    /// so the id is not reused and its old tokens never become valid again.
    #[prost(bool, tag = "7")]
    pub revoked: bool,
    /// When it was revoked, seconds since the Unix epoch (0 when it was not).
    #[prost(uint64, tag = "8")]
    pub revoked_at_unix_s: u64,
}

/// What the per-call check needs to know about a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClientState {
    generation: u64,
    revoked: bool,
}

/// Every client's secret generation and revoked flag, in memory, so the auth layer can refuse a
/// revoked client's or a superseded token on every call without reading the store. Loaded from
/// the `clients` tree at start and updated by every change before the change is acknowledged.
/// Cloning shares the map.
#[derive(Clone, Default)]
pub struct ClientStates(Arc<RwLock<HashMap<String, ClientState>>>);

impl ClientStates {
    fn set(&self, record: &ClientRecord) {
        let state = ClientState {
            generation: record.generation,
            revoked: record.revoked,
        };
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(record.id.clone(), state);
    }

    /// Whether a verified token may still be used: refused when its client was revoked, or when
    /// it was issued under an older secret generation (before a rotation).
    ///
    /// The generation is compared, not `iat` against a rotation time: both are whole seconds, so
    /// a token issued in the same second as a rotation, before or after it, looks the same by
    /// time; by generation it is exactly one or the other.
    ///
    /// A subject no client record names passes: the coordinator issues tokens only to stored
    /// clients and never deletes one (revoked clients stay as records), so such a token was
    /// minted with the signing key itself, whose holder can mint anything anyway.
    pub fn check(&self, claims: &Claims) -> Result<(), Error> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        match map.get(&claims.sub) {
            Some(state) if state.revoked => Err(Error::TokenRevoked {
                client: claims.sub.clone(),
                why: "its client was revoked: ask an administrator for a new client",
            }),
            Some(state) if state.generation != claims.generation => Err(Error::TokenRevoked {
                client: claims.sub.clone(),
                why: "it was issued before its client's secret was rotated: log in again \
                      with the new secret",
            }),
            _ => Ok(()),
        }
    }
}

/// Client store and token issuer.
pub struct Auth {
    store: Store,
    keys: Arc<SigningKeys>,
    issuer: String,
    ttl: Duration,
    /// Hash checked when the client id is unknown, so the answer takes as long as for a known id.
    decoy_hash: String,
    hashing: Semaphore,
    /// Failed-login back-off, checked before any hashing.
    throttle: LoginThrottle,
    /// Generations and revocations, for the per-call check.
    states: ClientStates,
    /// The bootstrap admin client's id (HEIST_ADMIN_CLIENT_ID).
    admin_id: String,
    /// Serialises changes to client records (read, decide, write).
    changes: tokio::sync::Mutex<()>,
}

impl Auth {
    /// Loads the client store and upserts the bootstrap admin client.
    pub async fn new(
        store: Store,
        keys: Arc<SigningKeys>,
        issuer: String,
        ttl: Duration,
        admin_id: &str,
        admin_secret: &str,
    ) -> Result<Self, Error> {
        let decoy_hash = blocking(|| hash_secret("decoy secret that matches nothing")).await?;
        let auth = Self {
            store,
            keys,
            issuer,
            ttl,
            decoy_hash,
            hashing: Semaphore::new(MAX_CONCURRENT_HASHES),
            throttle: LoginThrottle::new(&crate::config::Config::default()),
            states: ClientStates::default(),
            admin_id: admin_id.to_owned(),
            changes: tokio::sync::Mutex::new(()),
        };
        auth.upsert_client(admin_id, admin_secret, &[scopes::ADMIN])
            .await?;
        for record in Store::load_all::<ClientRecord>(&auth.store.clients, "client")? {
            auth.states.set(&record);
        }
        Ok(auth)
    }

    /// The in-memory generations and revocations the auth layer checks tokens against.
    pub fn states(&self) -> ClientStates {
        self.states.clone()
    }

    /// The bootstrap admin client's id.
    pub fn admin_id(&self) -> &str {
        &self.admin_id
    }

    /// Creates or updates a client (the bootstrap admin, from the configuration). The secret is
    /// re-hashed only when it changed, so restarts with the same configuration do not rewrite
    /// the record; a changed secret is a rotation (tokens issued under the old one are refused).
    #[instrument(skip_all, fields(client_id = %id))]
    pub async fn upsert_client(
        &self,
        id: &str,
        secret: &str,
        scopes: &[&str],
    ) -> Result<(), Error> {
        let _changing = self.changes.lock().await;
        let want_scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        let existing: Option<ClientRecord> =
            Store::get(&self.store.clients, id.as_bytes(), "client")?;
        let mut same_secret = false;
        if let Some(record) = &existing {
            if record.revoked {
                return Err(Error::InvalidConfig(format!(
                    "client {id} was revoked and cannot be the bootstrap admin: set \
                     HEIST_ADMIN_CLIENT_ID to another id"
                )));
            }
            same_secret = {
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
        let now = unix_now();
        let record = match existing.clone() {
            Some(old) => ClientRecord {
                secret_hash,
                scopes: want_scopes,
                updated_at_unix_s: now,
                generation: old.generation + u64::from(!same_secret),
                ..old
            },
            None => ClientRecord {
                id: id.to_owned(),
                secret_hash,
                scopes: want_scopes,
                updated_at_unix_s: now,
                created_at_unix_s: now,
                generation: 0,
                revoked: false,
                revoked_at_unix_s: 0,
            },
        };
        Store::put(&self.store.clients, id.as_bytes(), &record)?;
        self.store.flush().await?;
        self.states.set(&record);
        info!(
            created = existing.is_none(),
            scopes = %record.scopes.join(" "),
            generation = record.generation,
            "client stored"
        );
        Ok(())
    }

    /// Registers a new client with `scopes` (each known; at least one) and a fresh random
    /// secret; returns the record and the secret, which is not kept anywhere.
    #[instrument(skip_all, fields(client_id = %id))]
    pub async fn create_client(
        &self,
        id: &ClientId,
        scopes: &[String],
    ) -> Result<(ClientRecord, String), Error> {
        let scopes = validate_scopes(scopes)?;
        let secret = generate_secret()?;
        let secret_hash = {
            let secret = secret.clone();
            blocking(move || hash_secret(&secret)).await?
        };
        let _changing = self.changes.lock().await;
        if self.store.clients.contains_key(id.as_str().as_bytes())? {
            return Err(Error::ClientExists(id.clone()));
        }
        let now = unix_now();
        let record = ClientRecord {
            id: id.to_string(),
            secret_hash,
            scopes,
            updated_at_unix_s: now,
            created_at_unix_s: now,
            generation: 0,
            revoked: false,
            revoked_at_unix_s: 0,
        };
        Store::put(&self.store.clients, id.as_str().as_bytes(), &record)?;
        self.store.flush().await?;
        self.states.set(&record);
        info!(scopes = %record.scopes.join(" "), "client created");
        Ok((record, secret))
    }

    /// Every client record, ordered by id.
    pub fn list_clients(&self) -> Result<Vec<ClientRecord>, Error> {
        Store::load_all(&self.store.clients, "client")
    }

    /// Replaces a client's secret with a fresh random one and moves it to the next generation,
    /// so the old secret and every token issued under it are refused from now on. Returns the
    /// record and the new secret.
    #[instrument(skip_all, fields(client_id = %id))]
    pub async fn rotate_secret(&self, id: &ClientId) -> Result<(ClientRecord, String), Error> {
        self.refuse_bootstrap(id, "rotated")?;
        let secret = generate_secret()?;
        let secret_hash = {
            let secret = secret.clone();
            blocking(move || hash_secret(&secret)).await?
        };
        let _changing = self.changes.lock().await;
        let old = self.existing(id)?;
        if old.revoked {
            return Err(Error::ClientIsRevoked(id.clone()));
        }
        let record = ClientRecord {
            secret_hash,
            updated_at_unix_s: unix_now(),
            generation: old.generation + 1,
            ..old
        };
        Store::put(&self.store.clients, id.as_str().as_bytes(), &record)?;
        self.store.flush().await?;
        self.states.set(&record);
        info!(generation = record.generation, "client secret rotated");
        Ok((record, secret))
    }

    /// Revokes a client for good; returns the record and whether it was revoked already.
    #[instrument(skip_all, fields(client_id = %id))]
    pub async fn revoke_client(&self, id: &ClientId) -> Result<(ClientRecord, bool), Error> {
        self.refuse_bootstrap(id, "revoked")?;
        let _changing = self.changes.lock().await;
        let old = self.existing(id)?;
        if old.revoked {
            return Ok((old, true));
        }
        let now = unix_now();
        let record = ClientRecord {
            revoked: true,
            revoked_at_unix_s: now,
            updated_at_unix_s: now,
            ..old
        };
        Store::put(&self.store.clients, id.as_str().as_bytes(), &record)?;
        self.store.flush().await?;
        self.states.set(&record);
        info!("client revoked");
        Ok((record, false))
    }

    fn existing(&self, id: &ClientId) -> Result<ClientRecord, Error> {
        Store::get(&self.store.clients, id.as_str().as_bytes(), "client")?
            .ok_or_else(|| Error::ClientNotFound(id.clone()))
    }

    /// The bootstrap admin is the operator's way back in: its secret comes from the
    /// configuration (and is written again at every start), so the API may not change it.
    fn refuse_bootstrap(&self, id: &ClientId, verb: &'static str) -> Result<(), Error> {
        if id.as_str() == self.admin_id {
            return Err(Error::BootstrapClient {
                id: id.clone(),
                verb,
            });
        }
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
        if record.revoked {
            warn!("token refused: the client was revoked");
            return Err(Error::ClientRevoked(record.id));
        }
        let granted = resolve_scopes(&record.scopes, requested)?;
        let scope = granted.join(" ");
        let mut claims =
            TokenSigner::claims(&self.issuer, CLIENT_AUDIENCE, &record.id, &scope, self.ttl);
        // Should the record be rotated or revoked while this token is being signed, the token
        // carries the generation read above and the per-call check refuses it.
        claims.generation = record.generation;
        let access_token = self.keys.current().sign(&claims).map_err(Error::Signing)?;
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
            return Err(unknown_scope(scope));
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

/// INVALID_ARGUMENT for a scope no table knows, listing the known ones.
fn unknown_scope(scope: &str) -> Error {
    Error::Status(errors::invalid_argument(
        "scopes",
        format!(
            "unknown scope {scope:?}: use one of {}",
            scopes::ALL.join(", ")
        ),
    ))
}

/// The scopes of a new client: at least one, each known, without repeats.
fn validate_scopes(requested: &[String]) -> Result<Vec<String>, Error> {
    if requested.is_empty() {
        return Err(Error::Status(errors::invalid_argument(
            "scopes",
            format!(
                "a client needs at least one scope: use one or more of {}",
                scopes::ALL.join(", ")
            ),
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(requested.len());
    for scope in requested {
        if !scopes::ALL.contains(&scope.as_str()) {
            return Err(unknown_scope(scope));
        }
        if !out.contains(scope) {
            out.push(scope.clone());
        }
    }
    Ok(out)
}

/// A fresh client secret: 256 random bits as hex.
fn generate_secret() -> Result<String, Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| Error::SecretHash(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
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
        let keys = Arc::new(
            SigningKeys::open(&store, dir, "heist", Duration::from_secs(60)).expect("keys"),
        );
        let signer = keys.current();
        let auth = Auth::new(
            store,
            keys,
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
    async fn rotation_and_revocation_refuse_earlier_tokens_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (auth, signer) = auth(dir.path()).await;
        let verifier = TokenVerifier::new(&signer.public_key(), "heist", CLIENT_AUDIENCE);
        let states = auth.states();
        let id = ClientId::parse("bob").expect("id");
        let (record, secret) = auth
            .create_client(&id, &[scopes::TOOLS_READ.to_owned()])
            .await
            .expect("create");
        assert_eq!(record.generation, 0);
        let issue = async |secret: &str| {
            let token = auth.issue_token("bob", secret, &[]).await?.access_token;
            Ok::<_, Error>(verifier.verify(&token).expect("valid"))
        };
        let before = issue(&secret).await.expect("token");
        states.check(&before).expect("current");

        // Issued and rotated within the same second, most likely: told apart by generation.
        let (rotated, new_secret) = auth.rotate_secret(&id).await.expect("rotate");
        assert_eq!(rotated.generation, 1);
        assert!(matches!(
            states.check(&before),
            Err(Error::TokenRevoked { .. })
        ));
        assert!(matches!(
            issue(&secret).await,
            Err(Error::BadClientCredentials)
        ));
        let after = issue(&new_secret).await.expect("token");
        assert_eq!(after.generation, 1);
        states.check(&after).expect("current");

        let (_, already) = auth.revoke_client(&id).await.expect("revoke");
        assert!(!already);
        assert!(matches!(
            states.check(&after),
            Err(Error::TokenRevoked { .. })
        ));
        assert!(matches!(
            issue(&new_secret).await,
            Err(Error::ClientRevoked(_))
        ));
        assert!(auth.revoke_client(&id).await.expect("again").1);
        assert!(matches!(
            auth.rotate_secret(&id).await,
            Err(Error::ClientIsRevoked(_))
        ));
        assert!(matches!(
            auth.create_client(&id, &[scopes::TOOLS_READ.to_owned()])
                .await,
            Err(Error::ClientExists(_))
        ));

        // The bootstrap admin is refused, and unknown scopes name the valid ones.
        let admin = ClientId::parse("admin").expect("id");
        assert!(matches!(
            auth.revoke_client(&admin).await,
            Err(Error::BootstrapClient { .. })
        ));
        let err = auth
            .create_client(&ClientId::parse("c").expect("id"), &["root".to_owned()])
            .await
            .expect_err("unknown scope");
        assert!(err.to_string().contains("tools:call"), "{err}");

        // A restart loads the same states from the store.
        drop(auth);
        let (auth, _) = self::auth(dir.path()).await;
        assert!(auth.states().check(&after).is_err());
    }

    #[tokio::test]
    async fn bootstrap_rehashes_only_when_the_secret_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (auth, signer) = auth(dir.path()).await;
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
        let verifier = TokenVerifier::new(&signer.public_key(), "heist", CLIENT_AUDIENCE);
        let old = auth.issue_token("admin", SECRET, &[]).await.expect("token");
        let old = verifier.verify(&old.access_token).expect("valid");
        auth.upsert_client("admin", "a different secret!", &[scopes::ADMIN])
            .await
            .expect("changed");
        // A new configured secret is a rotation: tokens of the old one are refused.
        assert!(auth.states().check(&old).is_err());
        assert!(auth.issue_token("admin", SECRET, &[]).await.is_err());
        assert!(
            auth.issue_token("admin", "a different secret!", &[])
                .await
                .is_ok()
        );
    }
}
