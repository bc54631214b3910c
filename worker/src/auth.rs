//! Checking the coordinator-signed credential on every WorkerService call.
//!
//! The verifier comes from the coordinator's `Accepted` (public key, issuer, audience
//! `heist-worker:<id>`). It is replaced whenever a new `Accepted` carries different values (a
//! coordinator restarted with a new key), and kept otherwise so its verified-token cache stays
//! warm. Before the first `Accepted` nothing can be verified: calls get UNAVAILABLE.

use std::sync::{Arc, PoisonError, RwLock};

use heist_proto::{
    errors::reason,
    metadata,
    token::{Claims, TokenError, TokenVerifier},
    v1::Accepted,
};
use tonic::metadata::MetadataMap;

use crate::Error;

/// The audience of the coordinator's client tokens (`heist_coordinator::auth::CLIENT_AUDIENCE`).
const CLIENT_AUDIENCE: &str = "heist";

struct Installed {
    public_key: Vec<u8>,
    issuer: String,
    audience: String,
    verifier: TokenVerifier,
}

/// The current credential verifier, if a coordinator has accepted this worker.
#[derive(Default)]
pub struct Auth {
    current: RwLock<Option<Arc<Installed>>>,
}

impl Auth {
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
            TokenError::Invalid(why) => Error::Unauthenticated {
                reason: reason::TOKEN_INVALID,
                message: format!(
                    "the credential is not valid for this worker ({why}): workers only take \
                     calls from their coordinator; call the coordinator instead"
                ),
            },
        })
    }
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
