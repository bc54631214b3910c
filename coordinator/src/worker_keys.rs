//! Worker identity on the coordinator: which key each worker id is bound to, and the checks
//! every registration and blob call for that id must pass (see [`heist_proto::identity`]).
//!
//! The binding is made at a worker id's first enrolment (the first registration with the join
//! token that carries a valid proof) and kept in the `worker_keys` tree (worker id -> 32-byte
//! public key, flushed before the registration is accepted). It is never replaced by a worker:
//! an operator removes it with `HEIST_FORGET_WORKER_KEYS` (applied at start, logged) so a
//! worker whose key was lost can enrol again.

use std::time::Duration;

use heist_proto::{
    identity::{IdentityError, NonceCache, PURPOSE_BLOB, PURPOSE_REGISTER, Proof, register_bound},
    ids::WorkerId,
    metadata,
    v1::Register,
};
use tonic::metadata::MetadataMap;
use tracing::{info, warn};

use crate::{error::Error, store::Store};

/// How a registration's identity was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolment {
    /// First join of this id: the key is now bound to it.
    New,
    /// The id was bound to this key already.
    Known,
}

/// The worker id -> key bindings and the replay guard for proofs.
pub struct WorkerKeys {
    tree: sled::Tree,
    window: Duration,
    nonces: NonceCache,
}

impl WorkerKeys {
    /// Opens the bindings in `store`, first dropping those of the ids in `forget` (the
    /// operator's re-enrolment escape hatch).
    pub fn open(
        store: &Store,
        window: Duration,
        nonce_capacity: usize,
        forget: &[String],
    ) -> Result<Self, Error> {
        let tree = store.open_tree("worker_keys")?;
        for id in forget {
            if tree.remove(id.as_str().as_bytes())?.is_some() {
                warn!(worker_id = %id, "worker key forgotten (HEIST_FORGET_WORKER_KEYS): the next worker to join with this id enrols it");
            }
        }
        Ok(Self {
            tree,
            window,
            nonces: NonceCache::new(window, nonce_capacity),
        })
    }

    /// Checks a registration's proof for `id`, bound to its address and call-key share, and
    /// binds the id to the key on its first enrolment (not yet flushed: the caller flushes
    /// before accepting).
    pub fn check_register(&self, id: &WorkerId, register: &Register) -> Result<Enrolment, Error> {
        let invalid = |e: IdentityError| Error::WorkerIdentityInvalid {
            worker: id.to_string(),
            why: e.to_string(),
        };
        let identity = register.identity.as_ref().ok_or_else(|| {
            invalid(IdentityError::Malformed(
                "Register.identity is missing: upgrade the worker",
            ))
        })?;
        let proof = Proof::from_parts(
            &identity.public_key,
            identity.signed_at_ms,
            &identity.nonce,
            &identity.signature,
        )
        .map_err(invalid)?;
        let bound = self.bound_key(id)?;
        if let Some(key) = bound
            && key != proof.public_key
        {
            return Err(Error::WorkerIdentityMismatch(id.clone()));
        }
        proof
            .verify(
                PURPOSE_REGISTER,
                id.as_str(),
                &register_bound(&register.advertise_addr, &register.credential_key_share),
                self.window,
            )
            .map_err(invalid)?;
        self.nonces.check_fresh(&proof).map_err(invalid)?;
        if bound.is_some() {
            return Ok(Enrolment::Known);
        }
        // compare_and_swap: two first joins racing for one id cannot both bind.
        match self.tree.compare_and_swap(
            id.as_str().as_bytes(),
            None::<&[u8]>,
            Some(&proof.public_key[..]),
        )? {
            Ok(()) => {
                info!(worker_id = %id, key = %heist_proto::identity::to_hex(&proof.public_key), "worker enrolled: id bound to its key");
                Ok(Enrolment::New)
            }
            Err(_) => Err(Error::WorkerIdentityMismatch(id.clone())),
        }
    }

    /// Checks the identity proof of a BlobService call (`x-heist-worker-id` and
    /// `x-heist-worker-proof`, bound to the RPC path). Returns the worker id.
    pub fn check_blob_call(&self, md: &MetadataMap, path: &str) -> Result<WorkerId, Error> {
        let claimed = md
            .get(metadata::WORKER_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let invalid = |e: IdentityError| Error::WorkerIdentityInvalid {
            worker: claimed.to_owned(),
            why: e.to_string(),
        };
        let id = WorkerId::parse(claimed).map_err(|_| {
            invalid(IdentityError::Malformed(
                "x-heist-worker-id is missing or not a worker id",
            ))
        })?;
        let key = self
            .bound_key(&id)?
            .ok_or_else(|| invalid(IdentityError::Malformed("this worker id is not enrolled")))?;
        let header = md
            .get(metadata::WORKER_PROOF)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| invalid(IdentityError::Malformed("x-heist-worker-proof is missing")))?;
        let proof = Proof::from_header(key, header).map_err(invalid)?;
        proof
            .verify(PURPOSE_BLOB, id.as_str(), path.as_bytes(), self.window)
            .map_err(invalid)?;
        self.nonces.check_fresh(&proof).map_err(invalid)?;
        Ok(id)
    }

    fn bound_key(&self, id: &WorkerId) -> Result<Option<[u8; 32]>, Error> {
        Ok(self
            .tree
            .get(id.as_str().as_bytes())?
            .and_then(|v| <[u8; 32]>::try_from(v.as_ref()).ok()))
    }
}

#[cfg(test)]
mod tests {
    use heist_proto::identity::WorkerKey;

    use super::*;

    /// A Register for `id` at `addr`, signed by `key`.
    fn signed(key: &WorkerKey, id: &str, addr: &str) -> Register {
        let mut register = Register {
            worker_id: id.to_owned(),
            advertise_addr: addr.to_owned(),
            credential_key_share: vec![7; 32],
            ..Register::default()
        };
        key.sign_register(&mut register);
        register
    }

    /// `register` as someone on the way rewrote it: `addr` and `share` swapped in.
    fn rewritten(mut register: Register, addr: &str, share: &[u8]) -> Register {
        register.advertise_addr = addr.to_owned();
        register.credential_key_share = share.to_vec();
        register
    }

    #[test]
    fn an_id_stays_bound_to_its_first_key_until_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let window = Duration::from_secs(60);
        let keys = WorkerKeys::open(&store, window, 1024, &[]).expect("keys");
        let id = WorkerId::parse("w1").expect("id");
        let real = WorkerKey::from_seed(&[1; 32]);
        let other = WorkerKey::from_seed(&[2; 32]);
        let first = signed(&real, "w1", "a:1");
        assert_eq!(
            keys.check_register(&id, &first).expect("enrol"),
            Enrolment::New
        );
        assert!(matches!(
            keys.check_register(&id, &first),
            Err(Error::WorkerIdentityInvalid { .. })
        ));
        assert_eq!(
            keys.check_register(&id, &signed(&real, "w1", "a:1"))
                .expect("known"),
            Enrolment::Known
        );
        assert!(matches!(
            keys.check_register(&id, &signed(&other, "w1", "a:1")),
            Err(Error::WorkerIdentityMismatch(_))
        ));
        // Signed for another address or another call-key share: the proof does not cover
        // this registration.
        assert!(matches!(
            keys.check_register(
                &id,
                &rewritten(signed(&real, "w1", "a:1"), "evil:1", &[7; 32])
            ),
            Err(Error::WorkerIdentityInvalid { .. })
        ));
        assert!(matches!(
            keys.check_register(&id, &rewritten(signed(&real, "w1", "a:1"), "a:1", &[9; 32])),
            Err(Error::WorkerIdentityInvalid { .. })
        ));
        let mut unsigned = signed(&real, "w1", "a:1");
        unsigned.identity = None;
        assert!(keys.check_register(&id, &unsigned).is_err());
        drop(keys);
        let keys = WorkerKeys::open(&store, window, 1024, &["w1".to_owned()]).expect("keys");
        assert_eq!(
            keys.check_register(&id, &signed(&other, "w1", "a:1"))
                .expect("re-enrol"),
            Enrolment::New
        );
    }
}
