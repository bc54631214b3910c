//! Durable state: one sled database at `<data_dir>/db` with a tree per kind of record, values
//! prost-encoded, and the token signing seed in `<data_dir>/signing.key`.
//!
//! Trees: `workers` (worker id -> `heist.v1.Worker`), `sessions` (session id ->
//! `heist.v1.Session`), `idempotency` (key -> [`crate::idempotency::Record`]), `clients` (client id
//! -> [`crate::auth::ClientRecord`]), `meta` (schema version), `worker_keys` (worker id -> its
//! public key, see [`crate::worker_keys`]), `audit` (see [`crate::audit`]). The data directory
//! is `0700`. Writers insert synchronously and
//! call [`Store::flush`] before acknowledging a mutation to a client.
//!
//! Disk full: [`Store::writable`] is asked before a mutation does anything (it is refused
//! with STORE_FULL while the data directory's file system is below HEIST_STORE_MIN_FREE_BYTES
//! or after a failed flush), and [`Store::probe`] is the test write that lets the reserve's
//! monitor ([`heist_proto::space::Reserve::monitor`]) declare the store writable again.

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

use heist_proto::space::Reserve;
use prost::Message;
use tracing::warn;

use crate::{config::DEFAULT_STORE_MIN_FREE_BYTES, error::Error};

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
    /// The free-space reserve of the data directory (whether mutations are taken).
    pub reserve: Reserve,
    /// Token signing keys by `kid` ([`crate::signing_keys`]).
    pub signing_keys: sled::Tree,
}

/// The store's name in refusals and logs.
const WHAT: &str = "the coordinator's state store";

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
            reserve: Reserve::new(
                WHAT,
                "HEIST_STORE_MIN_FREE_BYTES",
                data_dir,
                DEFAULT_STORE_MIN_FREE_BYTES,
            ),
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

    /// The same store with a reserve of `min_free` bytes (HEIST_STORE_MIN_FREE_BYTES).
    pub fn with_min_free(mut self, min_free: u64) -> Self {
        self.reserve = Reserve::new(
            WHAT,
            "HEIST_STORE_MIN_FREE_BYTES",
            self.reserve.path(),
            min_free,
        );
        self
    }

    /// Before a mutation applies anything: refused (STORE_FULL) while the data directory's
    /// file system is below its reserve or the last flush failed.
    pub fn writable(&self) -> Result<(), Error> {
        self.reserve.check().map_err(Error::StoreFull)
    }

    /// `err` from a write that happened before anything was applied, as a refusal when the
    /// store has been found unwritable (so the client hears STORE_FULL, not UNAVAILABLE).
    pub fn refusal_for(&self, err: Error) -> Error {
        match (&err, self.reserve.refusal()) {
            (Error::Store(_) | Error::Io { .. }, Some(refusal)) => Error::StoreFull(refusal),
            _ => err,
        }
    }

    /// The monitor's test write: a record in `meta`, flushed.
    pub async fn probe(&self) -> Result<(), Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.meta.insert("probe", &now.to_be_bytes()[..])?;
        self.flush().await
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
        if let Err(err) = tokio::task::spawn_blocking(move || db.flush()).await? {
            // A failed flush (a full disk, an I/O error) stops mutations until a probe works.
            self.reserve.failed(&err);
            return Err(err.into());
        }
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

    #[tokio::test]
    async fn a_store_below_its_reserve_refuses_writes_with_store_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path())
            .expect("open")
            .with_min_free(1 << 20);
        store.writable().expect("room above 1 MiB");
        let full = Store::open(dir.path().join("other").as_path())
            .expect("open")
            .with_min_free(u64::MAX);
        let err = full
            .writable()
            .expect_err("no file system has u64::MAX free");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            heist_proto::errors::reason_of(&status).as_deref(),
            Some(heist_proto::errors::reason::STORE_FULL)
        );
        assert!(status.message().contains("other"), "{}", status.message());
        // A write error from before anything was applied is reported as the refusal.
        let mapped = full.refusal_for(Error::Store(sled::Error::Unsupported("x".into())));
        assert!(matches!(mapped, Error::StoreFull(_)));
        // The probe is a real write and flush.
        store.probe().await.expect("probe");
        assert!(store.meta.contains_key("probe").expect("read"));
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
