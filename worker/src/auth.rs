//! Checking the coordinator's credential on every WorkerService call, and the tokens the
//! coordinator signs for a worker (turn grants, client tokens on `/metrics`).
//!
//! **Per-call credentials** ([`Auth::check_call`]) are made with the call key this worker agreed
//! with its coordinator at registration ([`heist_proto::credential`]): a keyed hash over the
//! credential's id, its expiry and the digest of this RPC, the `x-heist-principal` and the
//! request. Each registration installs a new key; the previous one stays accepted for as long
//! as credentials it made can still be valid (`Accepted.credential_ttl_ms` plus leeway), so
//! calls already on their way when the worker re-registered still land. A credential naming a
//! key this worker does not hold yet (a call that overtook the `Accepted` on the control stream)
//! waits up to [`KEY_WAIT`] for it. Before the first key nothing is accepted: UNAVAILABLE.
//!
//! A credential for another worker fails on its key, one replayed for another call on its
//! digest, one replayed for the same call on its id: each id is accepted once (remembered until
//! the credential expires, plus leeway). Every refusal is logged at warn with the peer. The ids
//! are kept as 128-bit values in a set, and by the second their credential stops being
//! accepted, so the expired ones are dropped in order as time passes: no scan of the set on a
//! busy worker, and no id forgotten while its credential could still be replayed.
//!
//! **Signed tokens** are checked with the verifier from the coordinator's `Accepted` (current
//! public key, the retired keys still accepted, issuer, audience `heist-worker:<id>`). It is
//! replaced whenever a new `Accepted` carries different values (a key rotation, which the
//! coordinator sends on the open stream, or a coordinator restarted with a new key), and kept
//! otherwise so its verified-token cache stays warm. Tokens naming an unknown `kid` are refused.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use heist_proto::{
    credential::{CallKey, Credential, CredentialError},
    errors::reason,
    metadata,
    token::{AcceptedKey, Claims, LEEWAY_S, TokenVerifier, call_digest, key_id, unix_now},
    v1::Accepted,
};
use tonic::Request;
use tracing::warn;

use crate::Error;

/// The audience of the coordinator's client tokens (`heist_coordinator::auth::CLIENT_AUDIENCE`).
const CLIENT_AUDIENCE: &str = "heist";

/// Default for [`Auth::set_replay_capacity`]: about 40 MB when full, room for a sustained
/// 28,000 calls/s with the coordinator's default 30 s credentials.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1_000_000;

/// Longest a call whose credential names an unknown key waits for that key: the coordinator
/// sends the `Accepted` that carries it before making any credential with it, so it is at most
/// one control-stream message behind.
pub const KEY_WAIT: Duration = Duration::from_secs(2);

/// Most call keys held at once: the current one and those of recent registrations.
const MAX_CALL_KEYS: usize = 8;

/// Credential ids accepted whose credentials are still valid.
#[derive(Default)]
struct Seen {
    ids: HashSet<u128>,
    /// The same ids, by the second from which their credential is refused as expired.
    by_expiry: BTreeMap<u64, Vec<u128>>,
}

impl Seen {
    /// Forgets the ids whose credentials are refused as expired at `now`.
    fn forget_expired(&mut self, now: u64) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if *entry.key() > now {
                break;
            }
            for id in entry.remove() {
                self.ids.remove(&id);
            }
        }
    }
}

/// The call keys this worker holds: the current one first, then earlier ones, each with the
/// second from which it is no longer accepted.
#[derive(Default)]
struct CallKeys {
    keys: Vec<(Arc<CallKey>, Option<u64>)>,
}

impl CallKeys {
    fn find(&self, id: &str, now: u64) -> Option<Arc<CallKey>> {
        self.keys
            .iter()
            .find(|(k, until)| k.id() == id && until.is_none_or(|u| now < u))
            .map(|(k, _)| k.clone())
    }
}

struct Installed {
    /// The current key first, then the retired ones.
    keys: Vec<AcceptedKey>,
    issuer: String,
    audience: String,
    verifier: TokenVerifier,
}

/// The current token verifier and call keys, if a coordinator has accepted this worker, and
/// the credential ids already used.
pub struct Auth {
    current: RwLock<Option<Arc<Installed>>>,
    call_keys: RwLock<CallKeys>,
    /// Bumped on every new call key, for calls waiting for one.
    key_installed: tokio::sync::watch::Sender<u64>,
    /// A registration is on its way: a credential naming an unknown key may be one step ahead
    /// of its `Accepted`, and waits for it.
    registering: AtomicBool,
    /// Every credential id accepted whose credential has not expired.
    seen: Mutex<Seen>,
    capacity: AtomicUsize,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            call_keys: RwLock::default(),
            key_installed: tokio::sync::watch::Sender::new(0),
            registering: AtomicBool::new(false),
            seen: Mutex::default(),
            capacity: AtomicUsize::new(DEFAULT_REPLAY_CAPACITY),
        }
    }
}

impl Auth {
    /// Most credential ids remembered (HEIST_MAX_SEEN_CREDENTIALS).
    pub fn set_replay_capacity(&self, capacity: usize) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
    }

    /// Makes `key` (agreed at this registration) the current call key. The previous ones stay
    /// accepted for `previous_valid_for` plus leeway: the longest a credential they made can
    /// still be valid.
    pub fn install_call_key(&self, key: CallKey, previous_valid_for: Duration) {
        let now = unix_now();
        let until = now
            .saturating_add(previous_valid_for.as_secs().saturating_add(1))
            .saturating_add(LEEWAY_S);
        let mut keys = self
            .call_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, retired) in &mut keys.keys {
            retired.get_or_insert(until);
        }
        keys.keys.retain(|(_, u)| u.is_none_or(|u| now < u));
        keys.keys.insert(0, (Arc::new(key), None));
        keys.keys.truncate(MAX_CALL_KEYS);
        drop(keys);
        self.registering.store(false, Ordering::Relaxed);
        self.key_installed.send_modify(|n| *n += 1);
    }

    /// Says whether a registration is on its way (Register sent, its Accepted not yet
    /// installed): only then does a credential naming an unknown key wait for it.
    pub fn set_registering(&self, registering: bool) {
        self.registering.store(registering, Ordering::Relaxed);
        if !registering {
            // Wake the waiters: what they wait for will not come.
            self.key_installed.send_modify(|_| {});
        }
    }

    /// Id of the current call key.
    #[cfg(test)]
    pub fn call_key_id(&self) -> Option<String> {
        let keys = self
            .call_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        keys.keys.first().map(|(k, _)| k.id().to_owned())
    }

    /// Checks the bearer credential of a WorkerService call to `method` (e.g. "CallTool"):
    /// made with this worker's call key, for this very request, not expired and not used
    /// before.
    pub async fn check_call<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Error> {
        self.check_credential(request, method)
            .await
            .inspect_err(|err| refused(request.remote_addr(), method, err))
    }

    async fn check_credential<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Error> {
        let md = request.metadata();
        let token = metadata::bearer_token(md).ok_or_else(|| Error::Unauthenticated {
            reason: reason::TOKEN_MISSING,
            message: "missing `authorization: Bearer <credential>`: workers only take calls \
                      from their coordinator; call the coordinator instead"
                .to_owned(),
        })?;
        let credential =
            Credential::parse(token).map_err(|e| invalid_credential(&e.to_string()))?;
        let key = self.call_key(credential.key_id).await?;
        let principal = md
            .get(metadata::PRINCIPAL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let digest = call_digest(method, principal, &request.get_ref().encode_to_vec());
        key.verify(&credential, &digest).map_err(|err| match err {
            CredentialError::Expired => Error::Unauthenticated {
                reason: reason::TOKEN_EXPIRED,
                message: "the coordinator credential has expired: retry through the coordinator"
                    .to_owned(),
            },
            CredentialError::BadTag => invalid_credential(
                "it was issued for another call, or made with another worker's key",
            ),
            other => invalid_credential(&other.to_string()),
        })?;
        self.remember(credential.id, credential.exp)
    }

    /// The call key named `id`, waiting up to [`KEY_WAIT`] for it to be installed.
    async fn call_key(&self, id: &str) -> Result<Arc<CallKey>, Error> {
        // Subscribed before the first look: a key installed after it wakes the wait below.
        let mut installed = self.key_installed.subscribe();
        let deadline = tokio::time::Instant::now() + KEY_WAIT;
        loop {
            if let Some(key) = self.lookup(id).0 {
                return Ok(key);
            }
            let waited = self.registering.load(Ordering::Relaxed)
                && matches!(
                    tokio::time::timeout_at(deadline, installed.changed()).await,
                    Ok(Ok(()))
                );
            if !waited {
                // One last look: the registration may have just finished.
                return match self.lookup(id) {
                    (Some(key), _) => Ok(key),
                    (None, true) => Err(invalid_credential(
                        "it was made with a call key this worker does not hold",
                    )),
                    (None, false) => Err(Error::NotRegistered),
                };
            }
        }
    }

    /// The call key named `id` if held and still accepted, and whether any key is held.
    fn lookup(&self, id: &str) -> (Option<Arc<CallKey>>, bool) {
        let keys = self
            .call_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        (keys.find(id, unix_now()), !keys.keys.is_empty())
    }

    /// Records a credential's id; refuses one seen before.
    fn remember(&self, id: u128, exp: u64) -> Result<(), Error> {
        // A credential is accepted while now < exp + LEEWAY_S: remembered as long.
        let refused_from = exp.saturating_add(LEEWAY_S);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.forget_expired(unix_now());
        if seen.ids.contains(&id) {
            return Err(invalid_credential("it was already used (replay)"));
        }
        if seen.ids.len() >= self.capacity.load(Ordering::Relaxed) {
            return Err(Error::Unauthenticated {
                reason: reason::TOKEN_INVALID,
                message: "too many coordinator credentials in flight \
                          (HEIST_MAX_SEEN_CREDENTIALS): retry shortly"
                    .to_owned(),
            });
        }
        seen.ids.insert(id);
        seen.by_expiry.entry(refused_from).or_default().push(id);
        Ok(())
    }

    /// Installs the verifier described by `accepted`; returns whether it changed.
    pub fn install(&self, accepted: &Accepted) -> bool {
        let keys: Vec<AcceptedKey> = std::iter::once(AcceptedKey {
            public_key: accepted.coordinator_public_key.clone(),
            retired_until: None,
        })
        .chain(accepted.retired_keys.iter().map(|k| AcceptedKey {
            public_key: k.public_key.clone(),
            retired_until: Some(k.accepted_until_unix_s),
        }))
        .collect();
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let same = current.as_ref().is_some_and(|c| {
            c.keys == keys
                && c.issuer == accepted.credential_issuer
                && c.audience == accepted.credential_audience
        });
        if !same {
            *current = Some(Arc::new(Installed {
                verifier: TokenVerifier::with_keys(
                    &keys,
                    &accepted.credential_issuer,
                    &accepted.credential_audience,
                ),
                keys,
                issuer: accepted.credential_issuer.clone(),
                audience: accepted.credential_audience.clone(),
            }));
        }
        !same
    }

    /// `kid` of the coordinator's current key as installed (empty before the first Accepted):
    /// what heartbeats tell the coordinator.
    pub fn current_kid(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|c| c.keys.first())
            .map(|k| key_id(&k.public_key))
            .unwrap_or_default()
    }

    /// The claims of a turn grant: signed like the credential (same key, issuer and
    /// audience), carried in the request rather than its metadata.
    pub fn check_grant(&self, grant: &str) -> Result<Claims, Error> {
        if grant.is_empty() {
            return Err(Error::BadGrant("the request carries none".to_owned()));
        }
        self.installed()?
            .verifier
            .verify(grant)
            .map_err(|e| Error::BadGrant(e.to_string()))
    }

    fn installed(&self) -> Result<Arc<Installed>, Error> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::NotRegistered)
    }

    /// Whether `headers` carry a client token (audience [`CLIENT_AUDIENCE`]) signed by this
    /// worker's coordinator and granting `scope`: what `/metrics` asks for.
    pub fn check_client_scope(&self, headers: &http::HeaderMap, scope: &str) -> Result<(), Error> {
        let installed = self.installed()?;
        let refused = |message: &str| Error::Unauthenticated {
            reason: reason::TOKEN_INVALID,
            message: message.to_owned(),
        };
        let token = metadata::bearer(headers)
            .ok_or_else(|| refused("a bearer token with cluster:read is needed"))?;
        let verifier =
            TokenVerifier::with_keys(&installed.keys, &installed.issuer, CLIENT_AUDIENCE);
        let claims = verifier
            .verify(token)
            .map_err(|e| refused(&format!("the token is not valid here: {e}")))?;
        if !heist_proto::scopes::grants(&claims.scope, scope) {
            return Err(refused("the token lacks the scope"));
        }
        Ok(())
    }
}

fn invalid_credential(why: &str) -> Error {
    Error::Unauthenticated {
        reason: reason::TOKEN_INVALID,
        message: format!(
            "the credential is not valid for this worker ({why}): workers only take calls from \
             their coordinator; call the coordinator instead"
        ),
    }
}

/// Logs a refused credential: a direct call, a forgery or a replay is worth an operator's look.
fn refused(peer: Option<SocketAddr>, method: &str, err: &Error) {
    warn!(?peer, method, error = %err, "worker call refused: bad coordinator credential");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use heist_proto::{credential::KeyShare, token::TokenSigner};

    use super::*;

    fn signer() -> TokenSigner {
        TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer")
    }

    fn accepted(signer: &TokenSigner) -> Accepted {
        Accepted {
            coordinator_public_key: signer.public_key().to_vec(),
            credential_issuer: "heist".into(),
            credential_audience: "heist-worker:w1".into(),
            ..Default::default()
        }
    }

    /// A worker's call key and the coordinator's copy of it, agreed as at registration.
    fn agree(worker_id: &str) -> (CallKey, CallKey) {
        let (w, c) = (
            KeyShare::generate().expect("share"),
            KeyShare::generate().expect("share"),
        );
        let (wp, cp) = (w.public(), c.public());
        (
            w.agree_as_worker(&cp, worker_id).expect("agree"),
            c.agree_as_coordinator(&wp, worker_id).expect("agree"),
        )
    }

    fn request(
        token: &str,
        msg: &heist_proto::v1::WorkerCancelTurnRequest,
    ) -> Request<heist_proto::v1::WorkerCancelTurnRequest> {
        let mut r = Request::new(msg.clone());
        r.metadata_mut().insert(
            metadata::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("ascii"),
        );
        r
    }

    fn code(result: Result<(), Error>) -> tonic::Code {
        tonic::Status::from(result.expect_err("refused")).code()
    }

    fn cancel(turn: &str) -> heist_proto::v1::WorkerCancelTurnRequest {
        heist_proto::v1::WorkerCancelTurnRequest {
            turn_id: turn.into(),
        }
    }

    fn mint(key: &CallKey, method: &str, msg: &heist_proto::v1::WorkerCancelTurnRequest) -> String {
        let digest = call_digest(method, "", &prost::Message::encode_to_vec(msg));
        key.mint(&digest, Duration::from_secs(30)).expect("mint")
    }

    #[tokio::test]
    async fn refuses_everything_before_registration() {
        let auth = Auth::default();
        let (_, coordinator) = agree("w1");
        let msg = cancel("t-1");
        let r = request(&mint(&coordinator, "CancelTurn", &msg), &msg);
        assert_eq!(
            code(auth.check_call(&r, "CancelTurn").await),
            tonic::Code::Unavailable
        );
        // Without any credential the call is refused as such, registered or not.
        assert_eq!(
            code(auth.check_call(&Request::new(msg), "CancelTurn").await),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn a_credential_is_good_for_one_call_once() {
        let auth = Auth::default();
        let (worker, coordinator) = agree("w1");
        auth.install_call_key(worker, Duration::from_secs(30));
        let msg = cancel("t-1");
        let token = mint(&coordinator, "CancelTurn", &msg);
        auth.check_call(&request(&token, &msg), "CancelTurn")
            .await
            .expect("the call it was made for");
        // Replayed.
        let err = auth.check_call(&request(&token, &msg), "CancelTurn").await;
        assert!(format!("{err:?}").contains("replay"), "{err:?}");
        assert_eq!(code(err), tonic::Code::Unauthenticated);
        // For another method, or another request.
        let token = mint(&coordinator, "CancelTurn", &msg);
        assert_eq!(
            code(auth.check_call(&request(&token, &msg), "OpenSession").await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(
                auth.check_call(&request(&token, &cancel("t-2")), "CancelTurn")
                    .await
            ),
            tonic::Code::Unauthenticated
        );
        // Made with another worker's key, or missing.
        let (_, stranger) = agree("w2");
        let token = mint(&stranger, "CancelTurn", &msg);
        assert_eq!(
            code(auth.check_call(&request(&token, &msg), "CancelTurn").await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(
                auth.check_call(&Request::new(msg.clone()), "CancelTurn")
                    .await
            ),
            tonic::Code::Unauthenticated
        );
        // A token signed by the coordinator's signing key (a turn grant) is no call credential.
        let coordinator_signer = signer();
        auth.install(&accepted(&coordinator_signer));
        let grant = coordinator_signer
            .sign(&TokenSigner::claims(
                "heist",
                "heist-worker:w1",
                "coordinator",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");
        assert_eq!(
            code(auth.check_call(&request(&grant, &msg), "CancelTurn").await),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn a_new_registration_keeps_the_previous_key_for_calls_on_their_way() {
        let auth = Auth::default();
        let (old_worker, old) = agree("w1");
        auth.install_call_key(old_worker, Duration::from_secs(30));
        let msg = cancel("t-1");
        let on_its_way = mint(&old, "CancelTurn", &msg);
        let (new_worker, new) = agree("w1");
        auth.install_call_key(new_worker, Duration::from_secs(30));
        assert_eq!(auth.call_key_id().as_deref(), Some(new.id()));
        auth.check_call(&request(&on_its_way, &msg), "CancelTurn")
            .await
            .expect("made with the previous key, within its life");
        auth.check_call(
            &request(&mint(&new, "CancelTurn", &msg), &msg),
            "CancelTurn",
        )
        .await
        .expect("the new key");

        // With no time left for the previous key's credentials, it is gone.
        let (newer_worker, _) = agree("w1");
        auth.install_call_key(newer_worker, Duration::ZERO);
        {
            let mut keys = auth.call_keys.write().expect("keys");
            let now = unix_now();
            for entry in &mut keys.keys {
                entry.1 = entry.1.map(|_| now);
            }
        }
        assert_eq!(
            code(
                auth.check_call(
                    &request(&mint(&old, "CancelTurn", &msg), &msg),
                    "CancelTurn"
                )
                .await
            ),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn a_call_ahead_of_its_key_waits_for_it_while_registering() {
        let auth = Arc::new(Auth::default());
        let (first_worker, _) = agree("w1");
        auth.install_call_key(first_worker, Duration::from_secs(30));
        let (worker, coordinator) = agree("w1");
        let msg = cancel("t-1");
        let token = mint(&coordinator, "CancelTurn", &msg);
        // Not registering: an unknown key is refused at once.
        assert_eq!(
            code(auth.check_call(&request(&token, &msg), "CancelTurn").await),
            tonic::Code::Unauthenticated
        );
        auth.set_registering(true);
        let waiting = {
            let auth = auth.clone();
            let r = request(&token, &msg);
            tokio::spawn(async move { auth.check_call(&r, "CancelTurn").await })
        };
        tokio::task::yield_now().await;
        auth.install_call_key(worker, Duration::from_secs(30));
        waiting
            .await
            .expect("task")
            .expect("accepted once its key came");
    }

    #[test]
    fn an_id_is_remembered_while_its_credential_is_accepted() {
        let auth = Auth::default();
        auth.set_replay_capacity(1);
        // Expired two seconds ago: still accepted within the leeway, so still remembered,
        // even with the guard full.
        let late = unix_now() - 2;
        assert!(auth.remember(1, late).is_ok());
        let full = auth.remember(2, unix_now() + 30).expect_err("full");
        assert!(
            full.to_string().contains("HEIST_MAX_SEEN_CREDENTIALS"),
            "{full}"
        );
        assert!(
            auth.remember(1, late)
                .expect_err("replay")
                .to_string()
                .contains("already used"),
        );
        // Past the leeway the id is forgotten, and its place is free.
        let auth = Auth::default();
        auth.set_replay_capacity(1);
        assert!(
            auth.remember(1, unix_now().saturating_sub(LEEWAY_S + 1))
                .is_ok()
        );
        assert!(
            auth.remember(2, unix_now() + 30).is_ok(),
            "the expired id was forgotten"
        );
        let seen = auth.seen.lock().expect("seen");
        assert_eq!((seen.ids.len(), seen.by_expiry.len()), (1, 1));
    }

    #[test]
    fn a_new_key_replaces_the_verifier() {
        let old = signer();
        let new = signer();
        let auth = Auth::default();
        assert!(matches!(auth.check_grant("x"), Err(Error::NotRegistered)));
        assert!(auth.install(&accepted(&old)));
        assert!(
            !auth.install(&accepted(&old)),
            "same values keep the verifier"
        );
        let ttl = Duration::from_secs(60);
        let claims = TokenSigner::claims("heist", "heist-worker:w1", "alice", "turn:t-1", ttl);
        let old_token = old.sign(&claims).expect("sign");
        let new_token = new.sign(&claims).expect("sign");
        assert!(auth.check_grant(&old_token).is_ok());
        assert!(auth.install(&accepted(&new)));
        assert!(auth.check_grant(&new_token).is_ok());
        assert!(auth.check_grant(&old_token).is_err());
        // A client token from the same coordinator has another audience.
        let client = new
            .sign(&TokenSigner::claims(
                "heist", "heist", "alice", "admin", ttl,
            ))
            .expect("sign");
        assert!(auth.check_grant(&client).is_err());
    }

    #[test]
    fn a_rotation_keeps_the_retired_key_and_reports_the_new_kid() {
        let (old, new) = (signer(), signer());
        let auth = Auth::default();
        assert_eq!(auth.current_kid(), "");
        auth.install(&accepted(&old));
        assert_eq!(auth.current_kid(), old.kid());
        let ttl = Duration::from_secs(60);
        let claims = TokenSigner::claims("heist", "heist-worker:w1", "alice", "turn:t-1", ttl);
        let old_token = old.sign(&claims).expect("sign");
        let new_token = new.sign(&claims).expect("sign");
        let mut rotated = accepted(&new);
        rotated.retired_keys = vec![heist_proto::v1::RetiredKey {
            public_key: old.public_key().to_vec(),
            accepted_until_unix_s: unix_now() + 60,
        }];
        assert!(auth.install(&rotated));
        assert!(
            !auth.install(&rotated),
            "the same set again changes nothing"
        );
        assert_eq!(auth.current_kid(), new.kid());
        assert!(auth.check_grant(&new_token).is_ok());
        assert!(
            auth.check_grant(&old_token).is_ok(),
            "retired, within its window"
        );
        let stranger = signer().sign(&claims).expect("sign");
        let err = auth.check_grant(&stranger).expect_err("unknown kid");
        assert!(err.to_string().contains("unknown key"), "{err}");
    }
}
