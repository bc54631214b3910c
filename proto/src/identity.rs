//! Worker identity: the per-worker Ed25519 key that proves a registration, a reconnect or a blob
//! call comes from the machine that first enrolled a worker id.
//!
//! The join token only enrols. On its first join a worker creates a key (kept `0600` in its
//! data directory) and presents the public half; the coordinator binds the worker id to it for
//! good. Every later registration and blob call carries a [`Proof`]: a signature over a
//! domain-separated message naming what is proved (`purpose`), the worker id, the public key, a
//! fresh timestamp, a random nonce and the data the proof is bound to (the advertised address,
//! the RPC path). The coordinator checks the signature against the bound key, that the
//! timestamp is within its window, and that the nonce was not seen before (see [`NonceCache`]),
//! so a recorded proof cannot be replayed and a proof for one purpose cannot stand in for
//! another.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// Purpose of the proof in `Register.identity`.
pub const PURPOSE_REGISTER: &str = "register";
/// Purpose of the proof on a BlobService call.
pub const PURPOSE_BLOB: &str = "blob";

/// Why a proof was refused. Messages name what is wrong, never library internals.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The proof is missing or a field has the wrong shape.
    #[error("malformed worker identity proof: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the key.
    #[error("the worker identity signature does not verify")]
    BadSignature,
    /// The timestamp is outside the coordinator's window.
    #[error(
        "the worker identity proof is {skew_s}s away from the coordinator's clock (window {window_s}s): check the worker's clock"
    )]
    Stale {
        /// Distance from the coordinator's clock, in seconds.
        skew_s: u64,
        /// The accepted window, in seconds.
        window_s: u64,
    },
    /// The nonce was used before: a replayed proof.
    #[error("the worker identity proof was already used (replay)")]
    Replayed,
    /// The replay cache is full of unexpired nonces.
    #[error("too many worker identity proofs in the window: retry shortly")]
    Busy,
    /// The key file cannot be read or written.
    #[error("worker key {path}: {message}")]
    KeyFile {
        /// The key file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// A signed statement that the holder of a worker's key wants `purpose` now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// Raw 32-byte Ed25519 public key.
    pub public_key: [u8; 32],
    /// When it was signed, milliseconds since the Unix epoch.
    pub signed_at_ms: u64,
    /// 16 random bytes, never reused.
    pub nonce: [u8; 16],
    /// Ed25519 signature over [`message`].
    pub signature: [u8; 64],
}

/// A worker's identity key.
pub struct WorkerKey {
    key: SigningKey,
}

impl WorkerKey {
    /// Loads the key at `path`, or creates one there (file `0600`, missing directories `0700`).
    /// A key file readable by group or others is refused: fix its mode or delete it.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let fail = |message: String| IdentityError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let mode = fs::metadata(path)
                    .map_err(|e| fail(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(fail(format!(
                        "mode {:o} lets other users read it: chmod 600 it",
                        mode & 0o777
                    )));
                }
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    fail(format!("holds {} bytes; a key file holds 32", bytes.len()))
                })?;
                Ok(Self {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
                }
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed)
                    .map_err(|e| fail(format!("no randomness available: {e}")))?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| fail(format!("cannot create: {e}")))?;
                file.write_all(&seed)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| fail(format!("cannot write: {e}")))?;
                Ok(Self {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// A key from a 32-byte seed (tests, tools).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Sets `register.identity`: a fresh proof for its worker id, bound to its address and its
    /// call-key share ([`register_bound`]).
    pub fn sign_register(&self, register: &mut crate::v1::Register) {
        let bound = register_bound(&register.advertise_addr, &register.credential_key_share);
        let proof = self.prove(PURPOSE_REGISTER, &register.worker_id, &bound);
        register.identity = Some(proof.into());
    }

    /// A fresh proof for `purpose` by `worker_id`, bound to `bound`.
    pub fn prove(&self, purpose: &str, worker_id: &str, bound: &[u8]) -> Proof {
        let mut nonce = [0u8; 16];
        // Without randomness the nonce is still unique enough with the timestamp; the
        // coordinator refuses a repeat, so at worst a retry is needed.
        let _ = getrandom::fill(&mut nonce);
        let public_key = self.public_key();
        let signed_at_ms = unix_ms();
        let msg = message(purpose, worker_id, &public_key, signed_at_ms, &nonce, bound);
        Proof {
            public_key,
            signed_at_ms,
            nonce,
            signature: self.key.sign(&msg).to_bytes(),
        }
    }
}

/// What a registration's proof is bound to: the advertised address and the worker's call-key
/// share ([`crate::credential`]), each length-prefixed, so neither can be swapped on the way.
pub fn register_bound(advertise_addr: &str, key_share: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + advertise_addr.len() + key_share.len());
    for part in [advertise_addr.as_bytes(), key_share] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

impl From<Proof> for crate::v1::WorkerIdentity {
    fn from(proof: Proof) -> Self {
        Self {
            public_key: proof.public_key.to_vec(),
            signed_at_ms: proof.signed_at_ms,
            nonce: proof.nonce.to_vec(),
            signature: proof.signature.to_vec(),
        }
    }
}

/// The signed bytes: every field length-prefixed so no two inputs share an encoding.
pub fn message(
    purpose: &str,
    worker_id: &str,
    public_key: &[u8; 32],
    signed_at_ms: u64,
    nonce: &[u8; 16],
    bound: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + purpose.len() + worker_id.len() + bound.len());
    for part in [
        b"heist-worker-identity-v1".as_slice(),
        purpose.as_bytes(),
        worker_id.as_bytes(),
        public_key,
        &signed_at_ms.to_be_bytes(),
        nonce,
        bound,
    ] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

impl Proof {
    /// A proof from its wire fields (`Register.identity`), checking their sizes.
    pub fn from_parts(
        public_key: &[u8],
        signed_at_ms: u64,
        nonce: &[u8],
        signature: &[u8],
    ) -> Result<Self, IdentityError> {
        Ok(Self {
            public_key: public_key
                .try_into()
                .map_err(|_| IdentityError::Malformed("public_key must be 32 bytes"))?,
            signed_at_ms,
            nonce: nonce
                .try_into()
                .map_err(|_| IdentityError::Malformed("nonce must be 16 bytes"))?,
            signature: signature
                .try_into()
                .map_err(|_| IdentityError::Malformed("signature must be 64 bytes"))?,
        })
    }

    /// The compact text form carried in metadata: `<signed_at_ms>.<nonce>.<signature>` (hex).
    /// The public key is not included: the receiver uses the key it has bound.
    pub fn to_header(&self) -> String {
        format!(
            "{}.{}.{}",
            self.signed_at_ms,
            to_hex(&self.nonce),
            to_hex(&self.signature)
        )
    }

    /// Parses [`Proof::to_header`], with the bound `public_key`.
    pub fn from_header(public_key: [u8; 32], header: &str) -> Result<Self, IdentityError> {
        let mut parts = header.split('.');
        let (Some(ts), Some(nonce), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::Malformed(
                "expected <ms>.<nonce>.<signature>",
            ));
        };
        let signed_at_ms = ts
            .parse()
            .map_err(|_| IdentityError::Malformed("timestamp is not a number"))?;
        let nonce = from_hex(nonce).ok_or(IdentityError::Malformed("nonce is not hex"))?;
        let sig = from_hex(sig).ok_or(IdentityError::Malformed("signature is not hex"))?;
        Self::from_parts(&public_key, signed_at_ms, &nonce, &sig)
    }

    /// Checks the signature for `purpose`, `worker_id` and `bound`, and that the proof was
    /// signed within `window` of now. Replay is checked separately ([`NonceCache`]).
    pub fn verify(
        &self,
        purpose: &str,
        worker_id: &str,
        bound: &[u8],
        window: Duration,
    ) -> Result<(), IdentityError> {
        let now = unix_ms();
        let skew_ms = now.abs_diff(self.signed_at_ms);
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if skew_ms > window_ms {
            return Err(IdentityError::Stale {
                skew_s: skew_ms / 1000,
                window_s: window.as_secs(),
            });
        }
        let key = VerifyingKey::from_bytes(&self.public_key)
            .map_err(|_| IdentityError::Malformed("public_key is not an Ed25519 point"))?;
        let msg = message(
            purpose,
            worker_id,
            &self.public_key,
            self.signed_at_ms,
            &self.nonce,
            bound,
        );
        key.verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| IdentityError::BadSignature)
    }
}

/// Nonces seen within the window, so each proof is accepted once.
pub struct NonceCache {
    window: Duration,
    capacity: usize,
    seen: Mutex<HashMap<[u8; 16], u64>>,
}

impl NonceCache {
    /// A cache remembering nonces for `window` (the proof window, both sides of now), holding at
    /// most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records `proof`'s nonce; [`IdentityError::Replayed`] if it was seen within the window.
    pub fn check_fresh(&self, proof: &Proof) -> Result<(), IdentityError> {
        let now = unix_ms();
        let keep_ms = u64::try_from(self.window.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(2);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains_key(&proof.nonce) {
            return Err(IdentityError::Replayed);
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, at| now.saturating_sub(*at) <= keep_ms);
            if seen.len() >= self.capacity {
                return Err(IdentityError::Busy);
            }
        }
        seen.insert(proof.nonce, now);
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn a_proof_verifies_only_for_what_it_was_made_for() {
        let key = WorkerKey::from_seed(&[7; 32]);
        let proof = key.prove(PURPOSE_REGISTER, "w1", b"http://a:1");
        assert!(
            proof
                .verify(PURPOSE_REGISTER, "w1", b"http://a:1", WINDOW)
                .is_ok()
        );
        for (purpose, id, bound) in [
            (PURPOSE_BLOB, "w1", b"http://a:1".as_slice()),
            (PURPOSE_REGISTER, "w2", b"http://a:1"),
            (PURPOSE_REGISTER, "w1", b"http://b:1"),
        ] {
            assert_eq!(
                proof.verify(purpose, id, bound, WINDOW),
                Err(IdentityError::BadSignature)
            );
        }
        // Another key claiming to be this one.
        let mut forged = WorkerKey::from_seed(&[8; 32]).prove(PURPOSE_REGISTER, "w1", b"x");
        forged.public_key = key.public_key();
        assert_eq!(
            forged.verify(PURPOSE_REGISTER, "w1", b"x", WINDOW),
            Err(IdentityError::BadSignature)
        );
    }

    #[test]
    fn stale_and_replayed_proofs_are_refused() {
        let key = WorkerKey::from_seed(&[7; 32]);
        let mut old = key.prove(PURPOSE_BLOB, "w1", b"");
        old.signed_at_ms -= 120_000;
        assert!(matches!(
            old.verify(PURPOSE_BLOB, "w1", b"", WINDOW),
            Err(IdentityError::Stale { .. })
        ));
        let cache = NonceCache::new(WINDOW, 2);
        let p = key.prove(PURPOSE_BLOB, "w1", b"");
        assert!(cache.check_fresh(&p).is_ok());
        assert_eq!(cache.check_fresh(&p), Err(IdentityError::Replayed));
        assert!(
            cache
                .check_fresh(&key.prove(PURPOSE_BLOB, "w1", b""))
                .is_ok()
        );
        assert_eq!(
            cache.check_fresh(&key.prove(PURPOSE_BLOB, "w1", b"")),
            Err(IdentityError::Busy)
        );
    }

    #[test]
    fn the_header_form_round_trips() {
        let key = WorkerKey::from_seed(&[9; 32]);
        let p = key.prove(PURPOSE_BLOB, "w1", b"/x");
        let back = Proof::from_header(key.public_key(), &p.to_header()).expect("parses");
        assert_eq!(back, p);
        assert!(Proof::from_header(key.public_key(), "1.zz.00").is_err());
        assert!(Proof::from_header(key.public_key(), "1.2").is_err());
    }

    #[test]
    fn key_files_are_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("heist-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("sub").join("worker.key");
        let a = WorkerKey::load_or_create(&path).expect("created");
        let b = WorkerKey::load_or_create(&path).expect("loaded");
        assert_eq!(a.public_key(), b.public_key());
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            WorkerKey::load_or_create(&path),
            Err(IdentityError::KeyFile { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
