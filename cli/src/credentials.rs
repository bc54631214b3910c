//! The token cache: `<config dir>/heist/credentials.json`, one entry per coordinator URL.
//!
//! The directory is created with mode 0700 and the file written with mode 0600, atomically
//! (a temporary file in the same directory, fsync, rename), so a crash never leaves half a file
//! and no other local user can read a token. Client secrets are never stored.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A cached token for one coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedToken {
    /// The bearer token.
    pub access_token: String,
    /// Client id it was issued to.
    pub client_id: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Scopes it carries.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl CachedToken {
    /// Whether the token has expired at `now` (seconds since the Unix epoch).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }
}

/// The whole cache file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Tokens keyed by normalized coordinator URL.
    #[serde(default)]
    pub coordinators: BTreeMap<String, CachedToken>,
}

/// The token cache at a path.
#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The default cache: `dirs::config_dir()/heist/credentials.json`.
    pub fn default_location() -> Result<Self, Error> {
        let dir = dirs::config_dir().ok_or_else(|| {
            Error::Usage(
                "cannot find a config directory to cache the token in: set HOME or XDG_CONFIG_HOME"
                    .to_owned(),
            )
        })?;
        Ok(Self::at(dir.join("heist").join("credentials.json")))
    }

    /// A cache at an explicit path.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// Where the cache lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the cache; a missing file is an empty cache.
    pub fn load(&self) -> Result<Credentials, Error> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Credentials {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{e}; delete the file and run `heistctl login` again"),
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
            Err(source) => Err(self.error(source)),
        }
    }

    /// The cached token for a coordinator, if any.
    pub fn get(&self, url: &str) -> Result<Option<CachedToken>, Error> {
        Ok(self.load()?.coordinators.remove(&normalize_url(url)))
    }

    /// Stores (or replaces) the token for a coordinator.
    pub fn put(&self, url: &str, token: CachedToken) -> Result<(), Error> {
        let mut creds = self.load()?;
        creds.coordinators.insert(normalize_url(url), token);
        self.save(&creds)
    }

    /// Removes the token for a coordinator; returns whether there was one.
    pub fn remove(&self, url: &str) -> Result<bool, Error> {
        let mut creds = self.load()?;
        let had = creds.coordinators.remove(&normalize_url(url)).is_some();
        if had {
            self.save(&creds)?;
        }
        Ok(had)
    }

    /// Writes the whole cache atomically with mode 0600.
    fn save(&self, creds: &Credentials) -> Result<(), Error> {
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.error(e))?;
        let bytes = serde_json::to_vec_pretty(creds)
            .map_err(|e| self.error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let tmp = dir.join(format!(
            ".credentials.json.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // Make the rename itself durable.
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.error(e)
        })
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::Credentials {
            path: self.path.clone(),
            source,
        }
    }
}

/// The cache key of a coordinator URL: trimmed, without trailing slashes.
pub fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn token(t: &str) -> CachedToken {
        CachedToken {
            access_token: t.to_owned(),
            client_id: "admin".to_owned(),
            expires_at: 100,
            scopes: vec!["admin".to_owned()],
        }
    }

    fn temp_store() -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("heistctl-creds-{}", uuid::Uuid::new_v4()));
        let store = Store::at(dir.join("heist").join("credentials.json"));
        (dir, store)
    }

    #[test]
    fn round_trips_tokens_per_url_with_private_modes() {
        let (root, store) = temp_store();
        assert_eq!(store.get("http://a:1").expect("load"), None);
        store.put("http://a:1/", token("t1")).expect("put");
        store.put("http://b:2", token("t2")).expect("put");
        assert_eq!(
            store.get("http://a:1").expect("load"),
            Some(token("t1")),
            "trailing slash is normalized"
        );
        let mode = fs::metadata(store.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(store.path().parent().expect("parent"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        assert!(store.remove("http://a:1").expect("remove"));
        assert!(!store.remove("http://a:1").expect("remove"));
        assert_eq!(store.get("http://b:2").expect("load"), Some(token("t2")));
        fs::remove_dir_all(root).expect("cleanup");
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_says_what_to_do() {
        let (root, store) = temp_store();
        fs::create_dir_all(store.path().parent().expect("parent")).expect("mkdir");
        fs::write(store.path(), b"{not json").expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(err.to_string().contains("heistctl login"), "{err}");
        fs::remove_dir_all(root).expect("cleanup");
    }

    #[test]
    fn expiry_is_checked_against_now() {
        assert!(token("t").is_expired(100));
        assert!(!token("t").is_expired(99));
    }
}
