//! Checking the coordinator-signed credential on every WorkerService call.
//!
//! The verifier comes from the coordinator's `Accepted` (current public key, the retired keys
//! still accepted, issuer, audience `heist-worker:<id>`). It is replaced whenever a new
//! `Accepted` carries different values (a key rotation, which the coordinator sends on the open
//! stream, or a coordinator restarted with a new key), and kept otherwise so its verified-token
//! cache stays warm. Tokens naming an unknown `kid` are refused. Before the first `Accepted` nothing can be verified: calls get UNAVAILABLE.
//!
//! Each credential is for one call ([`Auth::check_call`]): its `req` claim must be the digest of
//! this RPC, the `x-heist-principal` and the request, and its `jti` is accepted once (remembered
//! until the credential expires). A credential replayed to another worker fails on its audience,
//! one replayed for another call on its digest, one replayed for the same call on its `jti`;
//! every refusal is logged at warn with the peer.
//!
//! The ids are kept as 128-bit values (the coordinator issues UUIDs) in a set, and by the second
//! their credential stops being accepted (`exp` + the verifier's leeway), so the expired ones are
//! dropped in order as time passes: no scan of the set on a busy worker, and no id forgotten
//! while its credential could still be replayed.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use heist_proto::{
    errors::reason,
    metadata,
    token::{
        AcceptedKey, Claims, LEEWAY_S, TokenError, TokenVerifier, call_digest, key_id, unix_now,
    },
    v1::Accepted,
};
use tonic::{Request, metadata::MetadataMap};
use tracing::warn;

use crate::Error;

/// The audience of the coordinator's client tokens (`heist_coordinator::auth::CLIENT_AUDIENCE`).
const CLIENT_AUDIENCE: &str = "heist";

/// Default for [`Auth::set_replay_capacity`]: about 40 MB when full, room for a sustained
/// 28,000 calls/s with the coordinator's default 30 s credentials.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1_000_000;

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

struct Installed {
    /// The current key first, then the retired ones.
    keys: Vec<AcceptedKey>,
    issuer: String,
    audience: String,
    verifier: TokenVerifier,
}

/// The current credential verifier, if a coordinator has accepted this worker, and the
/// credential ids already used.
pub struct Auth {
    current: RwLock<Option<Arc<Installed>>>,
    /// Every credential id accepted whose credential has not expired.
    seen: Mutex<Seen>,
    capacity: AtomicUsize,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
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

    /// Checks the bearer credential of a WorkerService call to `method` (e.g. "CallTool"):
    /// valid, for this worker, for this very request, and not used before.
    pub fn check_call<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<Claims, Error> {
        let md = request.metadata();
        let peer = request.remote_addr();
        let claims = self
            .check(md)
            .inspect_err(|err| refused(peer, method, err))?;
        let principal = md
            .get(metadata::PRINCIPAL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let digest = call_digest(method, principal, &request.get_ref().encode_to_vec());
        if claims.req != digest {
            let err = invalid_credential("it was issued for another call");
            refused(peer, method, &err);
            return Err(err);
        }
        self.remember(&claims)
            .inspect_err(|err| refused(peer, method, err))?;
        Ok(claims)
    }

    /// Records a credential's `jti`; refuses one seen before.
    fn remember(&self, claims: &Claims) -> Result<(), Error> {
        let id = uuid::Uuid::parse_str(&claims.jti)
            .map_err(|_| invalid_credential("its id is not one a coordinator issues"))?
            .as_u128();
        // The verifier accepts a credential while now < exp + LEEWAY_S: remembered as long.
        let refused_from = claims.exp.saturating_add(LEEWAY_S);
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

    /// The claims of the call's bearer credential.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Claims, Error> {
        let installed = self.installed()?;
        let token = metadata::bearer_token(metadata).ok_or_else(|| Error::Unauthenticated {
            reason: reason::TOKEN_MISSING,
            message: "missing `authorization: Bearer <credential>`: workers only take calls \
                      from their coordinator; call the coordinator instead"
                .to_owned(),
        })?;
        installed.verifier.verify(token).map_err(|err| match err {
            TokenError::Expired => Error::Unauthenticated {
                reason: reason::TOKEN_EXPIRED,
                message: "the coordinator credential has expired: retry through the coordinator"
                    .to_owned(),
            },
            TokenError::Invalid(why) => invalid_credential(&why),
        })
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

    use heist_proto::token::TokenSigner;

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

    fn bearer(token: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert(
            metadata::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("ascii"),
        );
        md
    }

    fn code(result: Result<Claims, Error>) -> tonic::Code {
        tonic::Status::from(result.expect_err("refused")).code()
    }

    #[test]
    fn refuses_everything_before_registration() {
        let auth = Auth::default();
        assert_eq!(
            code(auth.check(&MetadataMap::new())),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn accepts_coordinator_credentials_only() {
        let coordinator = signer();
        let auth = Auth::default();
        assert!(auth.install(&accepted(&coordinator)));
        assert!(
            !auth.install(&accepted(&coordinator)),
            "same values keep the verifier"
        );

        let ttl = Duration::from_secs(60);
        let good = coordinator
            .sign(&TokenSigner::claims(
                "heist",
                "heist-worker:w1",
                "coordinator",
                "",
                ttl,
            ))
            .expect("sign");
        assert_eq!(
            auth.check(&bearer(&good)).expect("valid").sub,
            "coordinator"
        );

        // A client token from the same coordinator has another audience.
        let client = coordinator
            .sign(&TokenSigner::claims(
                "heist", "heist", "alice", "admin", ttl,
            ))
            .expect("sign");
        assert_eq!(
            code(auth.check(&bearer(&client))),
            tonic::Code::Unauthenticated
        );
        // Forged with another key.
        let forged = signer()
            .sign(&TokenSigner::claims(
                "heist",
                "heist-worker:w1",
                "coordinator",
                "",
                ttl,
            ))
            .expect("sign");
        assert_eq!(
            code(auth.check(&bearer(&forged))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(auth.check(&MetadataMap::new())),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_credential_is_good_for_one_call_once() {
        let coordinator = signer();
        let auth = Auth::default();
        auth.install(&accepted(&coordinator));
        let msg = heist_proto::v1::WorkerCancelTurnRequest {
            turn_id: "t-1".into(),
        };
        let mint = |method: &str, msg: &heist_proto::v1::WorkerCancelTurnRequest| {
            let mut claims = TokenSigner::claims(
                "heist",
                "heist-worker:w1",
                "coordinator",
                "",
                Duration::from_secs(60),
            );
            claims.req = call_digest(method, "", &prost::Message::encode_to_vec(msg));
            coordinator.sign(&claims).expect("sign")
        };
        let request = |token: &str, msg: &heist_proto::v1::WorkerCancelTurnRequest| {
            let mut r = Request::new(msg.clone());
            *r.metadata_mut() = bearer(token);
            r
        };
        let token = mint("CancelTurn", &msg);
        assert!(
            auth.check_call(&request(&token, &msg), "CancelTurn")
                .is_ok()
        );
        // Replayed.
        assert_eq!(
            code(auth.check_call(&request(&token, &msg), "CancelTurn")),
            tonic::Code::Unauthenticated
        );
        // For another method, or another request.
        let token = mint("CancelTurn", &msg);
        assert_eq!(
            code(auth.check_call(&request(&token, &msg), "OpenSession")),
            tonic::Code::Unauthenticated
        );
        let other = heist_proto::v1::WorkerCancelTurnRequest {
            turn_id: "t-2".into(),
        };
        assert_eq!(
            code(auth.check_call(&request(&token, &other), "CancelTurn")),
            tonic::Code::Unauthenticated
        );
        // A credential without a call digest (e.g. a turn grant) is no call credential.
        let grant = coordinator
            .sign(&TokenSigner::claims(
                "heist",
                "heist-worker:w1",
                "alice",
                "turn:t-1",
                Duration::from_secs(60),
            ))
            .expect("sign");
        assert_eq!(
            code(auth.check_call(&request(&grant, &msg), "CancelTurn")),
            tonic::Code::Unauthenticated
        );
    }

    fn call_claims(exp: u64) -> Claims {
        let mut claims = TokenSigner::claims(
            "heist",
            "heist-worker:w1",
            "coordinator",
            "",
            Duration::from_secs(1),
        );
        claims.exp = exp;
        claims
    }

    #[test]
    fn an_id_is_remembered_while_its_credential_is_accepted() {
        let auth = Auth::default();
        auth.set_replay_capacity(1);
        // Expired two seconds ago: still accepted within the verifier's leeway, so still
        // remembered, even with the guard full.
        let late = call_claims(unix_now() - 2);
        assert!(auth.remember(&late).is_ok());
        let other = call_claims(unix_now() + 30);
        let full = auth.remember(&other).expect_err("full");
        assert!(
            full.to_string().contains("HEIST_MAX_SEEN_CREDENTIALS"),
            "{full}"
        );
        assert!(
            auth.remember(&late)
                .expect_err("replay")
                .to_string()
                .contains("already used"),
        );
        // Past the leeway the id is forgotten, and its place is free.
        let gone = call_claims(unix_now().saturating_sub(LEEWAY_S + 1));
        let auth = Auth::default();
        auth.set_replay_capacity(1);
        assert!(auth.remember(&gone).is_ok());
        assert!(
            auth.remember(&other).is_ok(),
            "the expired id was forgotten"
        );
        let seen = auth.seen.lock().expect("seen");
        assert_eq!((seen.ids.len(), seen.by_expiry.len()), (1, 1));
    }

    #[test]
    fn an_id_that_is_no_coordinator_id_is_refused() {
        let auth = Auth::default();
        let mut claims = call_claims(unix_now() + 30);
        claims.jti = "not-a-uuid".into();
        assert_eq!(
            tonic::Status::from(auth.remember(&claims).expect_err("refused")).code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_new_key_replaces_the_verifier() {
        let old = signer();
        let new = signer();
        let auth = Auth::default();
        auth.install(&accepted(&old));
        let ttl = Duration::from_secs(60);
        let claims = TokenSigner::claims("heist", "heist-worker:w1", "coordinator", "", ttl);
        let old_token = old.sign(&claims).expect("sign");
        let new_token = new.sign(&claims).expect("sign");
        assert!(auth.check(&bearer(&old_token)).is_ok());
        assert!(auth.install(&accepted(&new)));
        assert!(auth.check(&bearer(&new_token)).is_ok());
        assert_eq!(
            code(auth.check(&bearer(&old_token))),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_rotation_keeps_the_retired_key_and_reports_the_new_kid() {
        let (old, new) = (signer(), signer());
        let auth = Auth::default();
        assert_eq!(auth.current_kid(), "");
        auth.install(&accepted(&old));
        assert_eq!(auth.current_kid(), old.kid());
        let ttl = Duration::from_secs(60);
        let claims = TokenSigner::claims("heist", "heist-worker:w1", "coordinator", "", ttl);
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
        assert!(auth.check(&bearer(&new_token)).is_ok());
        assert!(
            auth.check(&bearer(&old_token)).is_ok(),
            "retired, within its window"
        );
        let stranger = signer().sign(&claims).expect("sign");
        let err = auth.check(&bearer(&stranger)).expect_err("unknown kid");
        assert!(err.to_string().contains("unknown key"), "{err}");
    }
}
