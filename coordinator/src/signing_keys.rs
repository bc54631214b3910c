//! The coordinator's token signing keys: one current key signs client tokens, worker credentials
//! and turn grants; retired keys still verify what they signed until it has expired.
//!
//! Keys live in the store's `signing_keys` tree (in the private data directory), by `kid`
//! ([`heist_proto::token::key_id`]): the 32-byte seed, when the key was made current and when it
//! was retired (0 while current). On the first start with an empty tree the key of
//! `signing.key` (created if missing) becomes the current key, so an upgraded coordinator keeps
//! its key and every token it issued. From then on the tree is the truth; `signing.key` is left
//! as it was (the first key).
//!
//! [`SigningKeys::rotate`] makes a fresh key current and retires the old one. A retired key is
//! accepted until `retired_at` + [`SigningKeys::window`] (the longest lifetime of anything the
//! coordinator signs, plus the verifiers' leeway) and dropped at the first rotation or start
//! after that. The client-token verifier ([`SigningKeys::client_verifier`]) follows every change.

use std::{
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use heist_proto::token::{AcceptedKey, LEEWAY_S, TokenSigner, TokenVerifier, unix_now};
use serde_json::{Value, json};

use crate::{auth::CLIENT_AUDIENCE, error::Error, store::Store};

/// A signing key as stored in the `signing_keys` tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyRecord {
    /// The 32-byte Ed25519 seed (the secret key).
    #[prost(bytes = "vec", tag = "1")]
    pub seed: Vec<u8>,
    /// When it became the current key, seconds since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub created_at_unix_s: u64,
    /// When it was retired, seconds since the Unix epoch; 0 while it is the current key.
    #[prost(uint64, tag = "3")]
    pub retired_at_unix_s: u64,
}

/// A key in memory.
struct Key {
    signer: Arc<TokenSigner>,
    record: KeyRecord,
}

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The new current key's id.
    pub key_id: String,
    /// The replaced key's id, now retired.
    pub retired_key_id: String,
    /// Seconds since the Unix epoch from which the retired key's tokens are refused.
    pub retired_until: u64,
    /// Retired keys dropped because everything they signed has expired.
    pub dropped: Vec<String>,
}

/// The current key and the retired keys still accepted.
pub struct SigningKeys {
    store: Store,
    /// How long a retired key stays accepted: the longest token lifetime plus leeway.
    window: Duration,
    /// Current key first, then retired keys, newest first.
    keys: RwLock<Vec<Key>>,
    client_verifier: Arc<TokenVerifier>,
    /// Serialises rotations.
    changes: tokio::sync::Mutex<()>,
    /// The directory of a test's store, removed with it.
    #[cfg(test)]
    _dir: Option<tempfile::TempDir>,
}

impl SigningKeys {
    /// Loads the keys (importing `<data_dir>/signing.key` into an empty tree) and drops retired
    /// keys past their window. `window` is the longest lifetime of a token or credential.
    pub fn open(
        store: &Store,
        data_dir: &Path,
        issuer: &str,
        longest_lifetime: Duration,
    ) -> Result<Self, Error> {
        let window = longest_lifetime + Duration::from_secs(LEEWAY_S);
        let mut keys = Vec::new();
        for item in &store.signing_keys {
            let (_, value) = item?;
            let record: KeyRecord = prost::Message::decode(value.as_ref()).map_err(|e| {
                Error::InvalidConfig(format!("a signing key record is corrupt: {e}"))
            })?;
            keys.push(key(record)?);
        }
        if keys.is_empty() {
            let seed = crate::store::load_or_create_signing_seed(data_dir)?;
            let record = KeyRecord {
                seed: seed.to_vec(),
                created_at_unix_s: unix_now(),
                retired_at_unix_s: 0,
            };
            let first = key(record)?;
            put(store, &first)?;
            keys.push(first);
        }
        keys.sort_by_key(|k| {
            (
                k.record.retired_at_unix_s != 0,
                u64::MAX - k.record.retired_at_unix_s,
            )
        });
        if keys
            .iter()
            .filter(|k| k.record.retired_at_unix_s == 0)
            .count()
            != 1
        {
            return Err(Error::InvalidConfig(
                "the signing_keys tree must hold exactly one current key".to_owned(),
            ));
        }
        let this = Self {
            store: store.clone(),
            window,
            client_verifier: Arc::new(TokenVerifier::with_keys(&[], issuer, CLIENT_AUDIENCE)),
            keys: RwLock::new(keys),
            changes: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            _dir: None,
        };
        this.drop_expired(unix_now())?;
        this.client_verifier.set_keys(&this.accepted());
        Ok(this)
    }

    /// Keys in a store of their own in a temporary directory, for tests.
    #[cfg(test)]
    pub fn for_tests() -> Arc<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut keys =
            Self::open(&store, dir.path(), "heist", Duration::from_secs(60)).expect("keys");
        keys._dir = Some(dir);
        Arc::new(keys)
    }

    /// How long a retired key stays accepted after its retirement.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The current key, which signs everything new.
    pub fn current(&self) -> Arc<TokenSigner> {
        self.read()[0].signer.clone()
    }

    /// The key named `kid`, current or retired and still accepted.
    pub fn signer(&self, kid: &str) -> Option<Arc<TokenSigner>> {
        let now = unix_now();
        self.read()
            .iter()
            .find(|k| k.signer.kid() == kid && self.accepted_until(k).is_none_or(|t| t > now))
            .map(|k| k.signer.clone())
    }

    /// The current key and the retired keys still accepted, for verifiers.
    pub fn accepted(&self) -> Vec<AcceptedKey> {
        let now = unix_now();
        self.read()
            .iter()
            .map(|k| AcceptedKey {
                public_key: k.signer.public_key().to_vec(),
                retired_until: self.accepted_until(k),
            })
            .filter(|k| k.retired_until.is_none_or(|t| t > now))
            .collect()
    }

    /// The verifier of client tokens (audience `heist`), kept on the accepted keys.
    pub fn client_verifier(&self) -> Arc<TokenVerifier> {
        self.client_verifier.clone()
    }

    /// The key that authenticates the audit log's signed head ([`crate::audit`]), derived from
    /// the signing key named `kid` (the current one when `None`) while the store holds it.
    pub fn audit_key(&self, kid: Option<&str>) -> Option<(String, [u8; 32])> {
        self.read()
            .iter()
            .find(|k| kid.is_none_or(|kid| k.signer.kid() == kid))
            .map(|k| {
                let key = blake3::derive_key("heist.v1 audit head", &k.record.seed);
                (k.signer.kid().to_owned(), key)
            })
    }

    /// The accepted keys as a JWK Set (RFC 7517; OKP keys per RFC 8037).
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .accepted()
            .iter()
            .map(|k| {
                json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": base64::Engine::encode(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                        &k.public_key,
                    ),
                    "kid": heist_proto::token::key_id(&k.public_key),
                    "use": "sig",
                    "alg": "EdDSA",
                })
            })
            .collect();
        json!({ "keys": keys })
    }

    /// Makes a fresh key current, retires the current one, drops retired keys past their
    /// window, and makes it durable before returning.
    pub async fn rotate(&self) -> Result<Rotation, Error> {
        let _changing = self.changes.lock().await;
        let seed = TokenSigner::generate_seed().map_err(Error::Signing)?;
        let now = unix_now();
        let fresh = key(KeyRecord {
            seed: seed.to_vec(),
            created_at_unix_s: now,
            retired_at_unix_s: 0,
        })?;
        let (retired_key_id, retired_until) = {
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            let old = &mut keys[0];
            old.record.retired_at_unix_s = now;
            put(&self.store, old)?;
            put(&self.store, &fresh)?;
            let retired = (old.signer.kid().to_owned(), now + self.window.as_secs());
            keys.insert(0, fresh);
            retired
        };
        let dropped = self.drop_expired(now)?;
        self.store.flush().await?;
        self.client_verifier.set_keys(&self.accepted());
        Ok(Rotation {
            key_id: self.current().kid().to_owned(),
            retired_key_id,
            retired_until,
            dropped,
        })
    }

    /// Removes the retired keys whose window ended; returns their ids.
    fn drop_expired(&self, now: u64) -> Result<Vec<String>, Error> {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for k in keys.drain(..) {
            if self.accepted_until(&k).is_some_and(|t| t <= now) {
                self.store.signing_keys.remove(k.signer.kid().as_bytes())?;
                dropped.push(k.signer.kid().to_owned());
            } else {
                kept.push(k);
            }
        }
        *keys = kept;
        Ok(dropped)
    }

    fn accepted_until(&self, k: &Key) -> Option<u64> {
        (k.record.retired_at_unix_s != 0)
            .then(|| k.record.retired_at_unix_s + self.window.as_secs())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Key>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(record: KeyRecord) -> Result<Key, Error> {
    let seed: [u8; 32] = record.seed.as_slice().try_into().map_err(|_| {
        Error::InvalidConfig(format!(
            "a stored signing key holds {} bytes, not a 32-byte Ed25519 seed",
            record.seed.len()
        ))
    })?;
    let signer = Arc::new(TokenSigner::from_seed(&seed).map_err(Error::Signing)?);
    Ok(Key { signer, record })
}

fn put(store: &Store, k: &Key) -> Result<(), Error> {
    Store::put(&store.signing_keys, k.signer.kid().as_bytes(), &k.record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, store: &Store) -> SigningKeys {
        SigningKeys::open(store, dir, "heist", Duration::from_secs(60)).expect("keys")
    }

    #[tokio::test]
    async fn rotation_keeps_the_old_key_for_its_window_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let keys = open(dir.path(), &store);
        // The first key is signing.key's.
        let seed = crate::store::load_or_create_signing_seed(dir.path()).expect("seed");
        let first = TokenSigner::from_seed(&seed).expect("signer");
        assert_eq!(keys.current().kid(), first.kid());
        let old_token = keys
            .current()
            .sign(&TokenSigner::claims(
                "heist",
                "heist",
                "a",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");

        let before = unix_now();
        let rotation = keys.rotate().await.expect("rotate");
        let after = unix_now();
        assert_eq!(rotation.retired_key_id, first.kid());
        assert_ne!(rotation.key_id, first.kid());
        // The window plus leeway from the rotation's second (which may tick over meanwhile).
        assert!(
            (before + 65..=after + 65).contains(&rotation.retired_until),
            "retired until {}, rotated between {before} and {after}",
            rotation.retired_until
        );
        assert_eq!(keys.current().kid(), rotation.key_id);
        assert!(
            keys.signer(first.kid()).is_some(),
            "retired, within its window"
        );
        assert!(keys.client_verifier().verify(&old_token).is_ok());
        let jwks = keys.jwks();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid"))
            .collect();
        assert_eq!(kids, [rotation.key_id.as_str(), first.kid()]);

        drop(keys);
        let reopened = open(dir.path(), &store);
        assert_eq!(reopened.current().kid(), rotation.key_id);
        assert_eq!(reopened.accepted().len(), 2);
        assert!(reopened.client_verifier().verify(&old_token).is_ok());
    }

    #[tokio::test]
    async fn retired_keys_past_their_window_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let keys = SigningKeys::open(&store, dir.path(), "heist", Duration::ZERO).expect("keys");
        let first = keys.current();
        let old_token = first
            .sign(&TokenSigner::claims(
                "heist",
                "heist",
                "a",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");
        keys.rotate().await.expect("rotate");
        // Retired now with a window of LEEWAY_S: backdate the retirement past it.
        {
            let mut all = keys.keys.write().expect("lock");
            all[1].record.retired_at_unix_s = unix_now() - LEEWAY_S - 1;
            put(&store, &all[1]).expect("put");
        }
        let rotation = keys.rotate().await.expect("rotate");
        assert_eq!(rotation.dropped, [first.kid().to_owned()]);
        assert!(keys.signer(first.kid()).is_none());
        let err = keys
            .client_verifier()
            .verify(&old_token)
            .expect_err("dropped");
        assert!(err.to_string().contains("unknown key"), "{err}");
        assert!(
            store
                .signing_keys
                .get(first.kid().as_bytes())
                .expect("get")
                .is_none()
        );
    }
}
