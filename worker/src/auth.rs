//! Checking the coordinator-signed credential on every WorkerService call.
//!
//! The verifier comes from the coordinator's `Accepted` (public key, issuer, audience
//! `heist-worker:<id>`). It is replaced whenever a new `Accepted` carries different values (a
//! coordinator restarted with a new key), and kept otherwise so its verified-token cache stays
//! warm. Before the first `Accepted` nothing can be verified: calls get UNAVAILABLE.
//!
//! Each credential is for one call ([`Auth::check_call`]): its `req` claim must be the digest of
//! this RPC, the `x-heist-principal` and the request, and its `jti` is accepted once (remembered
//! until the credential expires). A credential replayed to another worker fails on its audience,
//! one replayed for another call on its digest, one replayed for the same call on its `jti`;
//! every refusal is logged at warn with the peer.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use heist_proto::{
    errors::reason,
    metadata,
    token::{Claims, TokenError, TokenVerifier, call_digest, unix_now},
    v1::Accepted,
};
use tonic::{Request, metadata::MetadataMap};
use tracing::warn;

use crate::Error;

/// The audience of the coordinator's client tokens (`heist_coordinator::auth::CLIENT_AUDIENCE`).
const CLIENT_AUDIENCE: &str = "heist";

/// Default for [`Auth::set_replay_capacity`].
const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

struct Installed {
    public_key: Vec<u8>,
    issuer: String,
    audience: String,
    verifier: TokenVerifier,
}

/// The current credential verifier, if a coordinator has accepted this worker, and the
/// credential ids already used.
pub struct Auth {
    current: RwLock<Option<Arc<Installed>>>,
    /// `jti` -> `exp` of every credential accepted and not yet expired.
    seen: Mutex<HashMap<String, u64>>,
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
        let now = unix_now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains_key(&claims.jti) {
            return Err(invalid_credential("it was already used (replay)"));
        }
        if seen.len() >= self.capacity.load(Ordering::Relaxed) {
            seen.retain(|_, exp| *exp >= now);
            if seen.len() >= self.capacity.load(Ordering::Relaxed) {
                return Err(Error::Unauthenticated {
                    reason: reason::TOKEN_INVALID,
                    message: "too many coordinator credentials in flight \
                              (HEIST_MAX_SEEN_CREDENTIALS): retry shortly"
                        .to_owned(),
                });
            }
        }
        seen.insert(claims.jti.clone(), claims.exp);
        Ok(())
    }

    /// Installs the verifier described by `accepted`; returns whether it changed.
    pub fn install(&self, accepted: &Accepted) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let same = current.as_ref().is_some_and(|c| {
            c.public_key == accepted.coordinator_public_key
                && c.issuer == accepted.credential_issuer
                && c.audience == accepted.credential_audience
        });
        if !same {
            *current = Some(Arc::new(Installed {
                public_key: accepted.coordinator_public_key.clone(),
                issuer: accepted.credential_issuer.clone(),
                audience: accepted.credential_audience.clone(),
                verifier: TokenVerifier::new(
                    &accepted.coordinator_public_key,
                    &accepted.credential_issuer,
                    &accepted.credential_audience,
                ),
            }));
        }
        !same
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
            TokenVerifier::new(&installed.public_key, &installed.issuer, CLIENT_AUDIENCE);
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
}
