//! Worker configuration: defaults, the `HEIST_LABELS` parser and `validate()`.
//!
//! `main` fills a [`Config`] from flags and environment variables (every field has one, named in
//! its doc comment); tests build one with `Config { join_token: .., ..Config::default() }`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use heist_proto::ids::WorkerId;

use crate::Error;

/// Everything a worker needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Stable id of this worker (WORKER_ID). Default: the host name, or "worker-1".
    pub worker_id: String,
    /// Coordinator control-plane address (COORDINATOR_ADDR). Default "http://127.0.0.1:50051".
    pub coordinator_addr: String,
    /// Address the coordinator dials for session calls (HEIST_ADVERTISE_ADDR). `None` means
    /// `http://<listener local addr>` (an unspecified bind address is advertised as loopback).
    pub advertise_addr: Option<String>,
    /// Maximum concurrent sessions (MAX_SESSIONS). Default 64.
    pub max_sessions: u32,
    /// Directory holding one workspace per session (BASE_WORKSPACE). Default "./data/workspaces".
    pub base_workspace: PathBuf,
    /// Placement labels (HEIST_LABELS, "k=v,k2=v2"). Default none.
    pub labels: BTreeMap<String, String>,
    /// Join token presented to the coordinator (HEIST_JOIN_TOKEN). Required.
    pub join_token: String,
    /// First reconnect delay (HEIST_RECONNECT_MIN_MS). Default 100 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (HEIST_RECONNECT_MAX_MS). Default 5000 ms.
    pub reconnect_max: Duration,
    /// How long shutdown waits for in-flight calls (HEIST_DRAIN_TIMEOUT_S). Default 30 s.
    pub drain_timeout: Duration,
    /// Largest file fs.read returns and fs.write produces, in bytes (HEIST_MAX_FILE_BYTES).
    /// Default 8 MiB.
    pub max_file_bytes: u64,
    /// Most entries fs.list returns before it says it truncated (HEIST_MAX_LIST_ENTRIES).
    /// Default 10000.
    pub max_list_entries: usize,
    /// Largest gRPC message accepted or sent, in bytes (HEIST_MAX_MESSAGE_BYTES). Default 16 MiB.
    pub max_message_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            coordinator_addr: "http://127.0.0.1:50051".to_owned(),
            advertise_addr: None,
            max_sessions: 64,
            base_workspace: PathBuf::from("./data/workspaces"),
            labels: BTreeMap::new(),
            join_token: String::new(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(5000),
            drain_timeout: Duration::from_secs(30),
            max_file_bytes: 8 * 1024 * 1024,
            max_list_entries: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Checks the configuration; the error names the setting to fix.
    pub fn validate(&self) -> Result<(), Error> {
        WorkerId::parse(self.worker_id.as_str())
            .map_err(|status| Error::Config(format!("WORKER_ID: {}", status.message())))?;
        check_url("COORDINATOR_ADDR", &self.coordinator_addr)?;
        if let Some(addr) = &self.advertise_addr {
            check_url("HEIST_ADVERTISE_ADDR", addr)?;
        }
        if self.join_token.is_empty() {
            return Err(Error::Config(
                "HEIST_JOIN_TOKEN is required: set it to the coordinator's join token".to_owned(),
            ));
        }
        if tonic::metadata::MetadataValue::try_from(self.join_token.as_str()).is_err() {
            return Err(Error::Config(
                "HEIST_JOIN_TOKEN must be printable ASCII (it travels as gRPC metadata)".to_owned(),
            ));
        }
        if self.max_sessions == 0 {
            return Err(Error::Config("MAX_SESSIONS must be at least 1".to_owned()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::Config(
                "HEIST_RECONNECT_MIN_MS must be above 0 and at most HEIST_RECONNECT_MAX_MS"
                    .to_owned(),
            ));
        }
        if self.max_file_bytes == 0 || self.max_list_entries == 0 || self.max_message_bytes == 0 {
            return Err(Error::Config(
                "HEIST_MAX_FILE_BYTES, HEIST_MAX_LIST_ENTRIES and HEIST_MAX_MESSAGE_BYTES must be \
                 above 0"
                    .to_owned(),
            ));
        }
        if self.base_workspace.as_os_str().is_empty() {
            return Err(Error::Config("BASE_WORKSPACE must not be empty".to_owned()));
        }
        Ok(())
    }
}

/// Parses `HEIST_LABELS`: comma-separated `key=value` pairs; an empty string means no labels.
pub fn parse_labels(raw: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Error::Config(format!(
                "HEIST_LABELS entry {pair:?} is not key=value (example: zone=a,gpu=none)"
            )));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(Error::Config(format!(
                "HEIST_LABELS entry {pair:?} has an empty key"
            )));
        }
        labels.insert(key.to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

fn check_url(name: &str, raw: &str) -> Result<(), Error> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| Error::Config(format!("{name} {raw:?} is not a URL: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(Error::Config(format!(
            "{name} {raw:?} must look like http://host:port"
        ))),
    }
}

/// The host name if it is a valid worker id, else "worker-1".
fn default_worker_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| WorkerId::parse(h.as_str()).is_ok())
        .unwrap_or_else(|| "worker-1".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            join_token: "secret".to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_validate_once_a_join_token_is_set() {
        assert!(Config::default().validate().is_err());
        valid().validate().expect("valid");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    worker_id: "a/b".into(),
                    ..valid()
                },
                "WORKER_ID",
            ),
            (
                Config {
                    coordinator_addr: "localhost".into(),
                    ..valid()
                },
                "COORDINATOR_ADDR",
            ),
            (
                Config {
                    max_sessions: 0,
                    ..valid()
                },
                "MAX_SESSIONS",
            ),
            (
                Config {
                    reconnect_min: Duration::from_secs(10),
                    ..valid()
                },
                "HEIST_RECONNECT_MIN_MS",
            ),
            (
                Config {
                    join_token: "bad\ntoken".into(),
                    ..valid()
                },
                "HEIST_JOIN_TOKEN",
            ),
        ];
        for (config, needle) in cases {
            let err = config.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn parses_labels() {
        let labels = parse_labels("zone=a, gpu = none,,empty=").expect("labels");
        assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(labels.get("gpu").map(String::as_str), Some("none"));
        assert_eq!(labels.get("empty").map(String::as_str), Some(""));
        assert!(parse_labels("").expect("empty").is_empty());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("=x").is_err());
    }
}
