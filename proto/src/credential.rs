//! The per-call credential on every coordinator -> worker call: a MAC made with a key the
//! worker and its coordinator agree at each registration.
//!
//! **Agreement.** The worker puts a fresh X25519 public share in `Register` and signs it with
//! its identity key (it is part of the registration proof's bound data, see
//! [`crate::identity::register_bound`]), so nobody can swap it on the way. The coordinator
//! answers with its own fresh share in `Accepted`. Both sides compute the Diffie-Hellman secret
//! and derive the [`CallKey`] from it, both shares and the worker id ([`blake3::derive_key`]).
//! The key itself never crosses the wire: someone who reads a plaintext link sees only the
//! public shares. Every registration agrees a new key; the worker keeps the previous one for the
//! lifetime of the credentials it may still have made.
//!
//! **Credentials.** `hc1.<key id>.<id>.<exp>.<tag>`: the key's id (16 hex), a random 128-bit
//! credential id (32 hex), the expiry (seconds since the Unix epoch) and a BLAKE3 keyed hash
//! (64 hex) over all of them and the call's [`crate::token::call_digest`]. A worker accepts it
//! for that one call, before its expiry (plus [`crate::token::LEEWAY_S`]), once. A keyed hash
//! costs well under a microsecond where signing and verifying an Ed25519 token cost about a
//! hundred (see docs/BENCHMARKS.md).

use std::time::Duration;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::token::unix_now;

/// Prefix naming the credential format.
pub const SCHEME: &str = "hc1";
/// Context of the key derivation: the key is for nothing else.
const KEY_CONTEXT: &str = "heist 2026-12-01 coordinator->worker call credential key";
/// Context of the key id derivation.
const KEY_ID_CONTEXT: &str = "heist 2026-12-01 coordinator->worker call credential key id";

/// Why a share or a credential was refused. Messages say what is wrong, never the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// The text is not a credential of this format.
    #[error("it is not a coordinator credential ({0})")]
    Malformed(&'static str),
    /// The tag does not match: another key, another call, or edited.
    #[error("it was not made for this call with this worker's key")]
    BadTag,
    /// Past its expiry.
    #[error("it has expired")]
    Expired,
    /// The peer's share is not 32 bytes or gives a non-contributory secret.
    #[error("the key share is not usable ({0})")]
    BadShare(&'static str),
    /// No randomness for a share or a credential id.
    #[error("no randomness available: {0}")]
    NoRandomness(String),
}

/// One side's X25519 secret for one registration, and its public share.
pub struct KeyShare {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KeyShare {
    /// A fresh share.
    pub fn generate() -> Result<Self, CredentialError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| CredentialError::NoRandomness(e.to_string()))?;
        let secret = StaticSecret::from(seed);
        let public = PublicKey::from(&secret).to_bytes();
        Ok(Self { secret, public })
    }

    /// The public share (32 bytes) to send.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The worker's side: `coordinator_share` came in `Accepted`.
    pub fn agree_as_worker(
        self,
        coordinator_share: &[u8],
        worker_id: &str,
    ) -> Result<CallKey, CredentialError> {
        let peer = share(coordinator_share)?;
        self.agree(&peer, &self.public, &peer, worker_id)
    }

    /// The coordinator's side: `worker_share` came in `Register` (its proof checked).
    pub fn agree_as_coordinator(
        self,
        worker_share: &[u8],
        worker_id: &str,
    ) -> Result<CallKey, CredentialError> {
        let peer = share(worker_share)?;
        self.agree(&peer, &peer, &self.public, worker_id)
    }

    fn agree(
        &self,
        peer: &[u8; 32],
        worker_share: &[u8; 32],
        coordinator_share: &[u8; 32],
        worker_id: &str,
    ) -> Result<CallKey, CredentialError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(CredentialError::BadShare("a low-order point"));
        }
        let mut material = Vec::with_capacity(104 + worker_id.len());
        for part in [
            shared.as_bytes().as_slice(),
            worker_share,
            coordinator_share,
            worker_id.as_bytes(),
        ] {
            material.extend_from_slice(&(part.len() as u64).to_be_bytes());
            material.extend_from_slice(part);
        }
        Ok(CallKey::from_bytes(blake3::derive_key(
            KEY_CONTEXT,
            &material,
        )))
    }
}

fn share(bytes: &[u8]) -> Result<[u8; 32], CredentialError> {
    bytes
        .try_into()
        .map_err(|_| CredentialError::BadShare("an X25519 share is 32 bytes"))
}

/// The key one worker's credentials are made with, and its id.
pub struct CallKey {
    key: [u8; 32],
    id: String,
}

impl std::fmt::Debug for CallKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallKey").field("id", &self.id).finish()
    }
}

impl CallKey {
    /// A key from its 32 bytes (what [`KeyShare`] derives; tests).
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let id = blake3::derive_key(KEY_ID_CONTEXT, &key);
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&id[..8]);
        Self {
            key,
            id: format!("{:016x}", u64::from_be_bytes(prefix)),
        }
    }

    /// The key's public id (16 hex), named in every credential it makes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A credential for the one call whose [`crate::token::call_digest`] is `digest`, good for
    /// `ttl`.
    pub fn mint(&self, digest: &str, ttl: Duration) -> Result<String, CredentialError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| CredentialError::NoRandomness(e.to_string()))?;
        let id = u128::from_be_bytes(id);
        let exp = unix_now().saturating_add(ttl.as_secs().max(1));
        let tag = self.tag(id, exp, digest);
        Ok(format!(
            "{SCHEME}.{}.{id:032x}.{exp}.{}",
            self.id,
            tag.to_hex()
        ))
    }

    /// Checks that `credential` (made with this key: its key id matched) is for `digest` and
    /// not expired. Whether its id was used before is the caller's to check.
    pub fn verify(&self, credential: &Credential<'_>, digest: &str) -> Result<(), CredentialError> {
        // blake3::Hash compares in constant time.
        if self.tag(credential.id, credential.exp, digest) != blake3::Hash::from(credential.tag) {
            return Err(CredentialError::BadTag);
        }
        if unix_now() >= credential.exp.saturating_add(crate::token::LEEWAY_S) {
            return Err(CredentialError::Expired);
        }
        Ok(())
    }

    fn tag(&self, id: u128, exp: u64, digest: &str) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        for part in [
            SCHEME.as_bytes(),
            self.id.as_bytes(),
            &id.to_be_bytes(),
            &exp.to_be_bytes(),
            digest.as_bytes(),
        ] {
            hasher.update(&(part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize()
    }
}

/// A credential's fields, parsed but not yet checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    /// Id of the key it claims to be made with.
    pub key_id: &'a str,
    /// Its id, accepted once.
    pub id: u128,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    tag: [u8; 32],
}

impl<'a> Credential<'a> {
    /// Parses `hc1.<key id>.<id>.<exp>.<tag>`.
    pub fn parse(text: &'a str) -> Result<Self, CredentialError> {
        let mut parts = text.split('.');
        if parts.next() != Some(SCHEME) {
            return Err(CredentialError::Malformed("it does not start with `hc1.`"));
        }
        let (Some(key_id), Some(id), Some(exp), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CredentialError::Malformed("it does not have five parts"));
        };
        if key_id.len() != 16 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CredentialError::Malformed("bad key id"));
        }
        let id = (id.len() == 32)
            .then(|| u128::from_str_radix(id, 16).ok())
            .flatten()
            .ok_or(CredentialError::Malformed("bad id"))?;
        let exp = exp
            .parse()
            .map_err(|_| CredentialError::Malformed("bad expiry"))?;
        let tag = blake3::Hash::from_hex(tag)
            .map_err(|_| CredentialError::Malformed("bad tag"))?
            .into();
        Ok(Self {
            key_id,
            id,
            exp,
            tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::call_digest;

    fn agreed(worker_id: &str) -> (CallKey, CallKey) {
        let worker = KeyShare::generate().expect("share");
        let coordinator = KeyShare::generate().expect("share");
        let (w_pub, c_pub) = (worker.public(), coordinator.public());
        (
            worker.agree_as_worker(&c_pub, worker_id).expect("worker"),
            coordinator
                .agree_as_coordinator(&w_pub, worker_id)
                .expect("coordinator"),
        )
    }

    #[test]
    fn both_sides_agree_and_each_registration_gets_its_own_key() {
        let (w, c) = agreed("w1");
        assert_eq!(w.key, c.key);
        assert_eq!(w.id(), c.id());
        let (again, _) = agreed("w1");
        assert_ne!(again.key, w.key);
        assert!(!format!("{w:?}").contains(&crate::hash::hex(&w.key)));
    }

    #[test]
    fn a_credential_is_for_its_call_and_key_only() {
        let (worker, coordinator) = agreed("w1");
        let digest = call_digest("CallTool", "alice", b"request");
        let text = coordinator
            .mint(&digest, Duration::from_secs(30))
            .expect("mint");
        let cred = Credential::parse(&text).expect("parse");
        assert_eq!(cred.key_id, worker.id());
        worker
            .verify(&cred, &digest)
            .expect("the call it was made for");

        let other = call_digest("CallTool", "alice", b"another request");
        assert_eq!(worker.verify(&cred, &other), Err(CredentialError::BadTag));
        let (stranger, _) = agreed("w2");
        assert_eq!(
            stranger.verify(&cred, &digest),
            Err(CredentialError::BadTag)
        );

        // Any edited field breaks the tag.
        let edited = text.replacen(
            &format!(".{}.", cred.exp),
            &format!(".{}.", cred.exp + 60),
            1,
        );
        let edited = Credential::parse(&edited).expect("parse");
        assert_eq!(
            worker.verify(&edited, &digest),
            Err(CredentialError::BadTag)
        );
    }

    #[test]
    fn expired_and_malformed_credentials_are_refused() {
        let (worker, _) = agreed("w1");
        let digest = call_digest("CallTool", "", b"");
        let text = worker.mint(&digest, Duration::from_secs(1)).expect("mint");
        let mut cred = Credential::parse(&text).expect("parse");
        cred.exp = unix_now() - crate::token::LEEWAY_S - 1;
        cred.tag = *worker.tag(cred.id, cred.exp, &digest).as_bytes();
        assert_eq!(worker.verify(&cred, &digest), Err(CredentialError::Expired));

        for bad in [
            "",
            "eyJhbGciOiJFZERTQSJ9.e30.sig",
            "hc1.0011223344556677.00.1.00",
            "hc1.zz11223344556677.00000000000000000000000000000000.1.00",
            "hc1.0011223344556677.00000000000000000000000000000000.x.00",
            "hc1.a.b.c.d.e",
        ] {
            assert!(
                matches!(Credential::parse(bad), Err(CredentialError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn low_order_and_short_shares_are_refused() {
        let share = KeyShare::generate().expect("share");
        assert!(matches!(
            share.agree_as_coordinator(&[0u8; 32], "w1"),
            Err(CredentialError::BadShare(_))
        ));
        let share = KeyShare::generate().expect("share");
        assert!(matches!(
            share.agree_as_worker(&[1u8; 31], "w1"),
            Err(CredentialError::BadShare(_))
        ));
    }
}
