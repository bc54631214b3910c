//! Durable state: one sled database at `<data_dir>/db` with a tree per kind of record, values
//! prost-encoded, and the token signing seed in `<data_dir>/signing.key`.
//!
//! Trees: `workers` (worker id -> `heist.v1.Worker`), `sessions` (session id ->
//! `heist.v1.Session`), `idempotency` (key -> [`crate::idempotency::Record`]), `clients` (client id
//! -> [`crate::auth::ClientRecord`]), `meta` (schema version), `worker_keys` (worker id -> its
//! public key, see [`crate::worker_keys`]), `audit` (see [`crate::audit`]). The data directory
//! is `0700`. Writers insert synchronously and
//! call [`Store::flush`] before acknowledging a mutation to a client.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use tracing::warn;

use crate::error::Error;

/// Schema version written to `meta`; bump when a record changes incompatibly.
const SCHEMA_VERSION: &[u8] = b"1";
/// File holding the 32-byte Ed25519 seed that signs tokens.
const SIGNING_KEY_FILE: &str = "signing.key";

/// The sled database and its trees. Cloning is cheap (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// Group commit for [`Store::flush`].
    flusher: Arc<Flusher>,
    /// Worker records by id.
    pub workers: sled::Tree,
    /// Session records by id (ids are time-ordered, so key order is creation order).
    pub sessions: sled::Tree,
    /// Request-id records.
    pub idempotency: sled::Tree,
    /// Registered API clients.
    pub clients: sled::Tree,
    /// Store metadata.
    pub meta: sled::Tree,
    /// Token signing keys by `kid` ([`crate::signing_keys`]).
    pub signing_keys: sled::Tree,
}

/// Tickets for group commit: `requested` counts flush requests; the mutex serialises flushes and
/// holds the highest ticket known durable.
#[derive(Default)]
struct Flusher {
    requested: AtomicU64,
    running: tokio::sync::Mutex<u64>,
}

impl Store {
    /// Opens (or creates) the database under `data_dir`. A database left by a killed process
    /// reopens; sled replays its log.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        fs::create_dir_all(data_dir).map_err(|e| Error::io("cannot create", data_dir, e))?;
        // Only the coordinator's user may read the database, the blobs and the signing key.
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("cannot restrict", data_dir, e))?;
        let db = sled::Config::new().path(data_dir.join("db")).open()?;
        let store = Self {
            workers: db.open_tree("workers")?,
            sessions: db.open_tree("sessions")?,
            idempotency: db.open_tree("idempotency")?,
            clients: db.open_tree("clients")?,
            meta: db.open_tree("meta")?,
            signing_keys: db.open_tree("signing_keys")?,
            db,
            flusher: Arc::new(Flusher::default()),
        };
        match store.meta.get("schema_version")? {
            None => {
                store.meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(Error::InvalidConfig(format!(
                    "{} holds schema version {:?}, this build reads {:?}: use a matching build",
                    data_dir.display(),
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(SCHEMA_VERSION)
                )));
            }
        }
        Ok(store)
    }

    /// Makes every write the caller made before this call durable.
    ///
    /// Group commit: callers take a ticket, one flush runs at a time on the blocking pool, and a
    /// flush covers every ticket taken before it started, so N concurrent writers pay for about
    /// two fsyncs, not N. (sled's own `flush_async` is not used: in 0.34 concurrent calls to it
    /// can deadlock.)
    pub async fn flush(&self) -> Result<(), Error> {
        let ticket = self.flusher.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed_through = self.flusher.running.lock().await;
        if *flushed_through >= ticket {
            return Ok(());
        }
        let covers = self.flusher.requested.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await??;
        *flushed_through = covers;
        Ok(())
    }

    /// Opens (creating) another tree of the same database, for a module that owns its records
    /// (e.g. `checkpoints`); writes to it are covered by [`Store::flush`].
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, Error> {
        Ok(self.db.open_tree(name)?)
    }

    /// Encodes and inserts a record (not yet flushed).
    pub fn put<M: Message>(tree: &sled::Tree, key: &[u8], msg: &M) -> Result<(), Error> {
        tree.insert(key, msg.encode_to_vec())?;
        Ok(())
    }

    /// Reads and decodes one record.
    pub fn get<M: Message + Default>(
        tree: &sled::Tree,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<M>, Error> {
        tree.get(key)?
            .map(|bytes| {
                M::decode(bytes.as_ref()).map_err(|source| Error::Corrupt { what, source })
            })
            .transpose()
    }

    /// Reads and decodes every record of a tree, in key order.
    pub fn load_all<M: Message + Default>(
        tree: &sled::Tree,
        what: &'static str,
    ) -> Result<Vec<M>, Error> {
        tree.iter()
            .values()
            .map(|bytes| {
                let bytes = bytes?;
                M::decode(bytes.as_ref()).map_err(|source| Error::Corrupt { what, source })
            })
            .collect()
    }
}

/// The token signing seed from `<data_dir>/signing.key`, created (mode 0600) on first start so
/// tokens and worker credentials survive restarts.
pub fn load_or_create_signing_seed(data_dir: &Path) -> Result<[u8; 32], Error> {
    let path = data_dir.join(SIGNING_KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                Error::InvalidConfig(format!(
                    "{} holds {} bytes, not a 32-byte Ed25519 seed: remove it to generate a new \
                     key (every issued token becomes invalid)",
                    path.display(),
                    bytes.len()
                ))
            })?;
            if let Ok(meta) = fs::metadata(&path)
                && meta.permissions().mode() & 0o077 != 0
            {
                warn!(path = %path.display(), "signing key is readable by others: chmod 600 it");
            }
            Ok(seed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = heist_proto::token::TokenSigner::generate_seed().map_err(Error::Signing)?;
            // Write a temporary file and rename it so a crash never leaves a truncated key.
            let tmp = data_dir.join(format!("{SIGNING_KEY_FILE}.tmp"));
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io("cannot create", &tmp, e))?;
            file.write_all(&seed)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("cannot write", &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::io("cannot create", &path, e))?;
            if let Ok(dir) = fs::File::open(data_dir) {
                // Best effort: make the rename itself durable.
                let _ = dir.sync_all();
            }
            Ok(seed)
        }
        Err(e) => Err(Error::io("cannot read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use heist_proto::v1::{Session, SessionState};

    use super::*;

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let session = Session {
            id: "s-1".to_owned(),
            owner: "alice".to_owned(),
            state: SessionState::Ready as i32,
            ..Session::default()
        };
        {
            let store = Store::open(dir.path()).expect("open");
            Store::put(&store.sessions, b"s-1", &session).expect("put");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let got: Option<Session> = Store::get(&store.sessions, b"s-1", "session").expect("get");
        assert_eq!(got, Some(session.clone()));
        let all: Vec<Session> = Store::load_all(&store.sessions, "session").expect("load");
        assert_eq!(all, vec![session]);
    }

    #[test]
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .sessions
            .insert(b"x", &[0xff, 0xff, 0xff][..])
            .expect("insert");
        let got: Result<Option<Session>, _> = Store::get(&store.sessions, b"x", "session");
        assert!(matches!(
            got,
            Err(Error::Corrupt {
                what: "session",
                ..
            })
        ));
    }

    #[test]
    fn signing_seed_is_created_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_signing_seed(dir.path()).expect("create");
        let mode = fs::metadata(dir.path().join(SIGNING_KEY_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_signing_seed(dir.path()).expect("reload"),
            first
        );
    }

    #[test]
    fn truncated_signing_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(SIGNING_KEY_FILE), b"short").expect("write");
        assert!(matches!(
            load_or_create_signing_seed(dir.path()),
            Err(Error::InvalidConfig(_))
        ));
    }
}
