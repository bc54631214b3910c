//! JWTs: the claims heist puts in them, the signer (coordinator) and the verifier (coordinator for
//! client tokens, workers for coordinator credentials).
//!
//! The algorithm is pinned to EdDSA (Ed25519): a token whose header names any other algorithm —
//! `none`, `HS256` signed with the public key, anything — is rejected before its signature is
//! looked at. `iss`, `aud`, `exp` and `nbf` are always checked.
//!
//! Every token names its signing key in the header's `kid`: the key's RFC 7638 thumbprint
//! ([`key_id`]). A verifier holds a key set ([`AcceptedKey`]): the current key and retired keys,
//! each retired one accepted until a time its owner chose (when the last token it signed has
//! expired). A token naming a `kid` outside the set is refused as signed by an unknown key; a
//! token without `kid` (signed before keys had ids) is checked against the current key only.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The `kid` of an Ed25519 public key: its RFC 7638 JWK thumbprint, the base64url (unpadded)
/// SHA-256 of `{"crv":"Ed25519","kty":"OKP","x":"<key, base64url>"}` (members in the order RFC
/// 8037 section 2 gives for OKP keys). Stable, and anyone holding the JWK can recompute it.
pub fn key_id(public_key: &[u8]) -> String {
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public_key)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()))
}

/// One public key of a verifier's key set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedKey {
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// `None` for the current key; for a retired key, the second (since the Unix epoch) from
    /// which its tokens are refused: when the last token it signed has expired, plus leeway.
    pub retired_until: Option<u64>,
}

/// Claims of every heist token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer (the coordinator's configured issuer).
    pub iss: String,
    /// Audience: "heist" for client tokens, "heist-worker:<id>" for turn grants.
    pub aud: String,
    /// Subject: the client id (principal), or "coordinator".
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Unique token id.
    pub jti: String,
    /// Space-separated scopes.
    pub scope: String,
    /// On a client token: the client's secret generation when the token was issued (`gen`;
    /// 0, and absent from the JSON, before the first rotation). Each rotation of the client's
    /// secret adds one, and the coordinator refuses tokens of an older generation. A counter,
    /// not `iat`: `iat` has whole seconds, so a token issued in the same second as a rotation
    /// could not be told apart by time, before or after.
    #[serde(rename = "gen", default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a per-call worker credential ([`crate::credential`]) is bound to: BLAKE3 over the RPC name, the principal and
/// the encoded request, each length-prefixed, as hex. Both sides encode the same prost message
/// (no map fields in WorkerService requests, and `Struct` is ordered), so they agree.
pub fn call_digest(method: &str, principal: &str, request: &[u8]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [method.as_bytes(), principal.as_bytes(), request] {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    crate::hash::hex(hasher.finalize().as_bytes())
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// `exp` is in the past.
    #[error("the token has expired")]
    Expired,
    /// Anything else: bad signature, wrong algorithm, audience, issuer, malformed.
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// Signs tokens with an Ed25519 key.
pub struct TokenSigner {
    encoding: EncodingKey,
    public_key: [u8; 32],
    /// [`key_id`] of `public_key`, put in every token's header.
    kid: String,
}

impl TokenSigner {
    /// A signer from a 32-byte Ed25519 seed (the secret key).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, TokenError> {
        let key = SigningKey::from_bytes(seed);
        let der = key
            .to_pkcs8_der()
            .map_err(|e| TokenError::Invalid(format!("cannot encode signing key: {e}")))?;
        let public_key = key.verifying_key().to_bytes();
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public_key,
            kid: key_id(&public_key),
        })
    }

    /// A fresh random 32-byte seed.
    pub fn generate_seed() -> Result<[u8; 32], TokenError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| TokenError::Invalid(format!("no randomness available: {e}")))?;
        Ok(seed)
    }

    /// The raw 32-byte public key that verifies this signer's tokens.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// The key's id ([`key_id`]), named in the header of every token it signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs claims; the header names the key (`kid`).
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(format!("cannot sign token: {e}")))
    }

    /// Claims for a token valid from now for `ttl`.
    pub fn claims(iss: &str, aud: &str, sub: &str, scope: &str, ttl: Duration) -> Claims {
        let now = unix_now();
        Claims {
            iss: iss.to_owned(),
            aud: aud.to_owned(),
            sub: sub.to_owned(),
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.to_owned(),
            generation: 0,
        }
    }
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_S: u64 = 5;

/// Most tokens kept in the verified-token cache before it is cleared.
const CACHE_CAPACITY: usize = 4096;

/// Verifies tokens for one issuer and audience against a key set (see the module doc). Verified
/// tokens are cached (keyed by the whole token string) until they expire, so a client reusing
/// its token pays for the signature check once, not on every call. Replacing the key set
/// ([`TokenVerifier::set_keys`]) empties the cache.
pub struct TokenVerifier {
    keys: RwLock<Vec<VerifyingKey>>,
    validation: Validation,
    /// Claims by token, with the second from which the token is refused.
    cache: Mutex<HashMap<String, (Claims, u64)>>,
}

struct VerifyingKey {
    kid: String,
    decoding: DecodingKey,
    retired_until: Option<u64>,
}

impl TokenVerifier {
    /// A verifier for tokens signed by `public_key` (the only, current key) with this issuer and
    /// audience.
    pub fn new(public_key: &[u8], issuer: &str, audience: &str) -> Self {
        let key = AcceptedKey {
            public_key: public_key.to_vec(),
            retired_until: None,
        };
        Self::with_keys(&[key], issuer, audience)
    }

    /// A verifier for tokens signed by any key of `keys`, with this issuer and audience.
    pub fn with_keys(keys: &[AcceptedKey], issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_S;
        Self {
            keys: RwLock::new(verifying_keys(keys)),
            validation,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the key set (a rotation); tokens verified before are checked again.
    pub fn set_keys(&self, keys: &[AcceptedKey]) {
        let keys = verifying_keys(keys);
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let now = unix_now();
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((claims, refused_from)) = cache.get(token)
                && *refused_from > now
            {
                return Ok(claims.clone());
            }
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(describe(e.kind()).to_owned()))?;
        let (claims, retired_until) = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            let key = match &header.kid {
                Some(kid) => keys.iter().find(|k| &k.kid == kid).ok_or_else(|| {
                    TokenError::Invalid(format!(
                        "signed by an unknown key (kid {:?}): get a new token",
                        kid.chars().take(64).collect::<String>()
                    ))
                })?,
                // Issued before tokens named their key: only the current key may have signed it.
                None => keys
                    .iter()
                    .find(|k| k.retired_until.is_none())
                    .ok_or_else(|| TokenError::Invalid("no current key".to_owned()))?,
            };
            if key.retired_until.is_some_and(|until| until <= now) {
                return Err(TokenError::Invalid(format!(
                    "signed by a retired key (kid {:?}) no longer accepted: get a new token",
                    key.kid
                )));
            }
            let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    kind => TokenError::Invalid(describe(kind).to_owned()),
                })?;
            (data.claims, key.retired_until)
        };
        // The same leeway as the library's check: accepted until `exp` + LEEWAY_S, and cached
        // entries never outlive that (nor their key's acceptance).
        let refused_from = claims
            .exp
            .saturating_add(LEEWAY_S)
            .min(retired_until.unwrap_or(u64::MAX));
        if claims.exp.saturating_add(LEEWAY_S) <= now {
            return Err(TokenError::Expired);
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (claims.clone(), refused_from));
        Ok(claims)
    }
}

fn verifying_keys(keys: &[AcceptedKey]) -> Vec<VerifyingKey> {
    keys.iter()
        .map(|k| VerifyingKey {
            kid: key_id(&k.public_key),
            decoding: DecodingKey::from_ed_der(&k.public_key),
            retired_until: k.retired_until,
        })
        .collect()
}

/// What was wrong with a token, in our words: never the library's error text, which names its
/// internals.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm is not EdDSA",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        _ => "malformed token",
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> TokenSigner {
        TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer")
    }

    #[test]
    fn accepts_own_tokens_and_rejects_others() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "iss", "aud");
        let c = TokenSigner::claims("iss", "aud", "alice", "admin", Duration::from_secs(60));
        let t = s.sign(&c).expect("sign");
        assert_eq!(v.verify(&t).expect("valid"), c);
        // Cached path gives the same answer.
        assert_eq!(v.verify(&t).expect("valid"), c);

        let other = signer();
        let forged = other.sign(&c).expect("sign");
        assert!(matches!(v.verify(&forged), Err(TokenError::Invalid(_))));

        let wrong_aud = s
            .sign(&TokenSigner::claims(
                "iss",
                "x",
                "alice",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");
        assert!(matches!(v.verify(&wrong_aud), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn applies_the_documented_leeway_and_says_why_in_its_own_words() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "iss", "aud");
        let mut c = TokenSigner::claims("iss", "aud", "alice", "", Duration::from_secs(60));
        // Expired two seconds ago: within the leeway.
        c.exp = unix_now() - 2;
        assert!(v.verify(&s.sign(&c).expect("sign")).is_ok());
        c.exp = unix_now() - LEEWAY_S - 2;
        assert_eq!(
            v.verify(&s.sign(&c).expect("sign")),
            Err(TokenError::Expired)
        );
        let forged = signer()
            .sign(&TokenSigner::claims(
                "iss",
                "aud",
                "a",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");
        // Another key's token names a kid this verifier does not know.
        let Err(TokenError::Invalid(why)) = v.verify(&forged) else {
            panic!("a forged token was accepted");
        };
        assert!(why.starts_with("signed by an unknown key (kid "), "{why}");
        assert_eq!(
            v.verify("not.a.token"),
            Err(TokenError::Invalid("malformed token".to_owned()))
        );
    }

    #[test]
    fn rejects_expired_and_alg_none() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "iss", "aud");
        let mut c = TokenSigner::claims("iss", "aud", "alice", "admin", Duration::from_secs(60));
        c.exp = unix_now() - 3600;
        let t = s.sign(&c).expect("sign");
        assert_eq!(v.verify(&t), Err(TokenError::Expired));

        // {"alg":"none","typ":"JWT"} with valid claims and an empty signature.
        let c = TokenSigner::claims("iss", "aud", "alice", "admin", Duration::from_secs(60));
        let body = serde_json::to_vec(&c).expect("json");
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", b64url(&body));
        assert!(matches!(v.verify(&none), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn the_generation_claim_is_gen_and_absent_at_zero() {
        let mut c = TokenSigner::claims("iss", "aud", "alice", "", Duration::from_secs(60));
        let json = serde_json::to_value(&c).expect("json");
        assert!(json.get("gen").is_none(), "{json}");
        c.generation = 3;
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["gen"], 3);
        let back: Claims = serde_json::from_value(json).expect("claims");
        assert_eq!(back.generation, 3);
    }

    #[test]
    fn key_id_is_the_rfc_7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key of A.2.
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("b64");
        assert_eq!(key_id(&x), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        let s = signer();
        assert_eq!(s.kid(), key_id(&s.public_key()));
        let t = s
            .sign(&TokenSigner::claims(
                "iss",
                "aud",
                "a",
                "",
                Duration::from_secs(60),
            ))
            .expect("sign");
        let header = jsonwebtoken::decode_header(&t).expect("header");
        assert_eq!(header.kid.as_deref(), Some(s.kid()));
    }

    fn token(s: &TokenSigner) -> String {
        s.sign(&TokenSigner::claims(
            "iss",
            "aud",
            "a",
            "",
            Duration::from_secs(60),
        ))
        .expect("sign")
    }

    /// A token signed without `kid` in its header, as before keys had ids.
    fn token_without_kid(s: &TokenSigner) -> String {
        let c = TokenSigner::claims("iss", "aud", "a", "", Duration::from_secs(60));
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &c, &s.encoding).expect("sign")
    }

    fn key(s: &TokenSigner, retired_until: Option<u64>) -> AcceptedKey {
        AcceptedKey {
            public_key: s.public_key().to_vec(),
            retired_until,
        }
    }

    #[test]
    fn a_key_set_accepts_current_and_retired_keys_within_their_window_only() {
        let (current, retired, expired, stranger) = (signer(), signer(), signer(), signer());
        let now = unix_now();
        let keys = [
            key(&current, None),
            key(&retired, Some(now + 60)),
            key(&expired, Some(now)),
        ];
        let v = TokenVerifier::with_keys(&keys, "iss", "aud");
        assert!(v.verify(&token(&current)).is_ok());
        assert!(
            v.verify(&token(&retired)).is_ok(),
            "retired, within its window"
        );
        let past = v
            .verify(&token(&expired))
            .expect_err("retired past its window");
        assert!(
            past.to_string().contains("retired key") && past.to_string().contains(expired.kid()),
            "{past}"
        );
        let unknown = v.verify(&token(&stranger)).expect_err("unknown kid");
        assert!(
            unknown.to_string().contains("unknown key")
                && unknown.to_string().contains(stranger.kid()),
            "{unknown}"
        );
        // No kid: checked against the current key only.
        assert!(v.verify(&token_without_kid(&current)).is_ok());
        assert_eq!(
            v.verify(&token_without_kid(&retired)),
            Err(TokenError::Invalid("bad signature".to_owned()))
        );
        // A kid naming a key of the set does not let another key's signature through.
        let mut forged = token(&current);
        let (head, _) = token(&retired)
            .split_once('.')
            .map(|(h, r)| (h.to_owned(), r.to_owned()))
            .expect("jwt");
        let rest = forged
            .split_once('.')
            .map(|(_, r)| r.to_owned())
            .expect("jwt");
        forged = format!("{head}.{rest}");
        assert_eq!(
            v.verify(&forged),
            Err(TokenError::Invalid("bad signature".to_owned()))
        );
    }

    #[test]
    fn replacing_the_key_set_drops_cached_tokens_of_removed_keys() {
        let (old, new) = (signer(), signer());
        let v = TokenVerifier::new(&old.public_key(), "iss", "aud");
        let t = token(&old);
        assert!(v.verify(&t).is_ok());
        v.set_keys(&[key(&new, None), key(&old, Some(unix_now() + 60))]);
        assert!(v.verify(&t).is_ok(), "retired within its window");
        assert!(v.verify(&token(&new)).is_ok());
        v.set_keys(&[key(&new, None)]);
        assert!(v.verify(&t).is_err(), "a cached token of a dropped key");
    }

    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}
