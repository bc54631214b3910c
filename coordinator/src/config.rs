//! Coordinator configuration: typed fields with documented defaults, checked by
//! [`Config::validate`] before anything is opened or bound.

use std::{fmt, path::PathBuf, time::Duration};

use crate::error::Error;

/// Shortest admin client secret accepted, in characters.
pub const MIN_ADMIN_SECRET_CHARS: usize = 16;

/// Everything [`crate::serve`] needs besides the listener. `main` fills it from flags and
/// environment variables; tests build it directly.
#[derive(Clone)]
pub struct Config {
    /// Where the sled database (`db/`) and the token signing key (`signing.key`) live.
    /// HEIST_DATA_DIR, default `./data/coordinator`.
    pub data_dir: PathBuf,
    /// Shared secret workers present in `x-heist-join-token` to join. HEIST_JOIN_TOKEN, required.
    pub join_token: String,
    /// Id of the bootstrap admin client. HEIST_ADMIN_CLIENT_ID, default `admin`.
    pub admin_client_id: String,
    /// Secret of the bootstrap admin client (stored only as an Argon2id hash).
    /// HEIST_ADMIN_CLIENT_SECRET, required, at least 16 characters.
    pub admin_client_secret: String,
    /// `iss` of every token the coordinator signs. HEIST_TOKEN_ISSUER, default `heist`.
    pub token_issuer: String,
    /// Lifetime of client access tokens. HEIST_TOKEN_TTL_S, default 3600 s.
    pub token_ttl: Duration,
    /// A worker that neither heartbeats nor reconnects within this is marked lost.
    /// HEIST_LEASE_TTL_MS, default 10000 ms.
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat. HEIST_HEARTBEAT_INTERVAL_MS, default 2000 ms.
    pub heartbeat_interval: Duration,
    /// Cap on the deadline forwarded to workers (and the deadline used when the caller sent none).
    /// HEIST_WORKER_CALL_TIMEOUT_S, default 300 s.
    pub worker_call_timeout: Duration,
    /// How long request-id records are kept for retries. HEIST_IDEMPOTENCY_TTL_S, default 86400 s.
    pub idempotency_ttl: Duration,
    /// Largest gRPC message accepted or sent. HEIST_MAX_MESSAGE_BYTES, default 16 MiB.
    pub max_message_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data/coordinator"),
            join_token: String::new(),
            admin_client_id: "admin".to_owned(),
            admin_client_secret: String::new(),
            token_issuer: "heist".to_owned(),
            token_ttl: Duration::from_secs(3600),
            lease_ttl: Duration::from_millis(10_000),
            heartbeat_interval: Duration::from_millis(2_000),
            worker_call_timeout: Duration::from_secs(300),
            idempotency_ttl: Duration::from_secs(86_400),
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Secrets are redacted so a `?config` in a log line never leaks them.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("join_token", &"<redacted>")
            .field("admin_client_id", &self.admin_client_id)
            .field("admin_client_secret", &"<redacted>")
            .field("token_issuer", &self.token_issuer)
            .field("token_ttl", &self.token_ttl)
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("worker_call_timeout", &self.worker_call_timeout)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl Config {
    /// Checks every field; the error names the variable to fix.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: &str| Err(Error::InvalidConfig(msg.to_owned()));
        if self.join_token.trim().is_empty() {
            return bad(
                "HEIST_JOIN_TOKEN is empty: set it to a shared secret workers will present",
            );
        }
        if self.admin_client_id.trim().is_empty() {
            return bad(
                "HEIST_ADMIN_CLIENT_ID is empty: set it to the bootstrap admin's client id",
            );
        }
        if self.admin_client_secret.chars().count() < MIN_ADMIN_SECRET_CHARS {
            return bad(
                "HEIST_ADMIN_CLIENT_SECRET is shorter than 16 characters: set a longer secret",
            );
        }
        if self.token_issuer.trim().is_empty() {
            return bad("HEIST_TOKEN_ISSUER is empty: leave it unset for the default `heist`");
        }
        if self.token_ttl.as_secs() == 0 {
            return bad("HEIST_TOKEN_TTL_S must be at least 1 second");
        }
        if self.heartbeat_interval.is_zero() {
            return bad("HEIST_HEARTBEAT_INTERVAL_MS must be positive");
        }
        if self.lease_ttl <= self.heartbeat_interval {
            return bad(
                "HEIST_LEASE_TTL_MS must be longer than HEIST_HEARTBEAT_INTERVAL_MS \
                 (a few heartbeats per lease)",
            );
        }
        if self.worker_call_timeout.is_zero() {
            return bad("HEIST_WORKER_CALL_TIMEOUT_S must be at least 1 second");
        }
        if self.idempotency_ttl.is_zero() {
            return bad("HEIST_IDEMPOTENCY_TTL_S must be at least 1 second");
        }
        if self.max_message_bytes < 1024 {
            return bad("HEIST_MAX_MESSAGE_BYTES must be at least 1024");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            join_token: "join".to_owned(),
            admin_client_secret: "0123456789abcdef".to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn default_needs_secrets() {
        assert!(Config::default().validate().is_err());
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn rejects_short_secret_and_inverted_lease() {
        let short = Config {
            admin_client_secret: "short".to_owned(),
            ..valid()
        };
        assert!(short.validate().is_err());
        let inverted = Config {
            lease_ttl: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(200),
            ..valid()
        };
        assert!(inverted.validate().is_err());
    }

    #[test]
    fn debug_redacts_secrets() {
        let shown = format!("{:?}", valid());
        assert!(!shown.contains("0123456789abcdef"));
        assert!(!shown.contains("\"join\""));
    }
}
