//! The local cluster's secrets (worker join token, bootstrap admin secret), kept in
//! `DATA_DIR/dev.env` as shell exports with mode 0600 so `source dev.env` works.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use crate::{cluster::ADMIN_CLIENT_ID, error::Error};

/// Generated secrets of a local cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct DevSecrets {
    /// HEIST_JOIN_TOKEN shared by coordinator and workers.
    pub join_token: String,
    /// HEIST_ADMIN_CLIENT_SECRET of the bootstrap admin.
    pub admin_secret: String,
}

impl std::fmt::Debug for DevSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevSecrets { .. }")
    }
}

impl DevSecrets {
    /// Fresh random secrets (256 bits each).
    pub fn generate() -> Self {
        Self {
            join_token: random_hex(),
            admin_secret: random_hex(),
        }
    }

    /// The secrets in an existing `dev.env` (so a restart on the same data dir keeps them),
    /// else fresh ones.
    pub fn load_or_generate(path: &Path) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::generate()),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .collect();
        match (
            vars.get("HEIST_JOIN_TOKEN"),
            vars.get("HEIST_ADMIN_CLIENT_SECRET"),
        ) {
            (Some(join), Some(secret)) if !join.is_empty() && !secret.is_empty() => Ok(Self {
                join_token: (*join).to_owned(),
                admin_secret: (*secret).to_owned(),
            }),
            _ => Ok(Self::generate()),
        }
    }

    /// Writes `dev.env` (mode 0600) and returns its path; with `ca_cert`, it exports
    /// HEIST_CA_CERT too (a TLS cluster).
    pub fn write(
        &self,
        path: &Path,
        coordinator_url: &str,
        ca_cert: Option<&Path>,
    ) -> Result<PathBuf, Error> {
        let mut text = format!(
            "# heist local cluster (heistctl dev up). Private: source it to talk to the cluster.\n\
             export HEIST_COORDINATOR={coordinator_url}\n\
             export HEIST_JOIN_TOKEN={join}\n\
             export HEIST_ADMIN_CLIENT_ID={ADMIN_CLIENT_ID}\n\
             export HEIST_ADMIN_CLIENT_SECRET={secret}\n\
             export HEIST_CLIENT_ID={ADMIN_CLIENT_ID}\n\
             export HEIST_CLIENT_SECRET={secret}\n",
            join = self.join_token,
            secret = self.admin_secret,
        );
        if let Some(ca) = ca_cert {
            text.push_str(&format!("export HEIST_CA_CERT={}\n", ca.display()));
        }
        let tmp = path.with_extension("env.tmp");
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(path.to_path_buf())
    }
}

/// 32 random bytes as hex (two UUIDv4s: 244 random bits, plenty for a local secret).
fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn dev_env_round_trips_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("heistctl-env-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("dev.env");
        let fresh = DevSecrets::load_or_generate(&path).expect("generate");
        assert_eq!(fresh.join_token.len(), 64);
        assert_ne!(fresh.join_token, fresh.admin_secret);
        fresh
            .write(&path, "http://127.0.0.1:1", None)
            .expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(DevSecrets::load_or_generate(&path).expect("load"), fresh);
        assert!(!format!("{fresh:?}").contains(&fresh.admin_secret));
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
