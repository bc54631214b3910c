//! Where a local cluster's pieces go: ports, per-worker labels, the data directory, and the
//! environment passed to each child.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::error::Error;

/// An env pair.
pub(crate) fn env(key: &str, value: impl std::fmt::Display) -> (String, String) {
    (key.to_owned(), value.to_string())
}

/// The labels string of each worker: one entry for all, or one per worker (missing: none).
pub(crate) fn labels_per_worker(labels: &[String], workers: usize) -> Result<Vec<String>, Error> {
    for entry in labels {
        parse_labels(entry)?;
    }
    Ok(match labels {
        [] => vec![String::new(); workers],
        [one] => vec![one.clone(); workers],
        many => {
            if many.len() > workers {
                return Err(Error::Usage(format!(
                    "{} --worker-labels values for {workers} workers: give one value for all workers or at most one per worker",
                    many.len()
                )));
            }
            (0..workers)
                .map(|i| many.get(i).cloned().unwrap_or_default())
                .collect()
        }
    })
}

/// Parses `k=v,k2=v2` (empty means no labels).
pub fn parse_labels(raw: &str) -> Result<BTreeMap<String, String>, Error> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(Error::Usage(format!(
                "label {pair:?} is not key=value (e.g. gpu=true)"
            ))),
        })
        .collect()
}

/// The coordinator port followed by one port per worker.
pub(crate) fn pick_ports(port: u16, workers: usize) -> Result<Vec<u16>, Error> {
    if port == 0 {
        // Hold every listener until all are chosen so no port is picked twice.
        let listeners = (0..=workers)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::io("cannot find free ports on 127.0.0.1", e))?;
        return listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::io("cannot read a bound port", e));
    }
    (0..=workers)
        .map(|i| {
            u16::try_from(i)
                .ok()
                .and_then(|i| port.checked_add(i))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "port {port} + {workers} workers goes past 65535: choose a lower --port"
                    ))
                })
        })
        .collect()
}

/// Creates (or reuses) the data directory.
pub(crate) fn prepare_data_dir(dir: Option<&Path>) -> Result<PathBuf, Error> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("heist-dev-{}", uuid::Uuid::new_v4().simple())),
    };
    create_dir(&dir)?;
    dir.canonicalize()
        .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))
}

/// `mkdir -p` with mode 0700 for new directories.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_coordinator_port_or_are_free() {
        assert_eq!(
            pick_ports(50051, 2).expect("ports"),
            vec![50051, 50052, 50053]
        );
        assert!(pick_ports(65535, 1).is_err());
        let free = pick_ports(0, 3).expect("free ports");
        assert_eq!(free.len(), 4);
        let mut unique = free.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 4, "{free:?}");
    }

    #[test]
    fn worker_labels_apply_to_all_or_one_each() {
        assert_eq!(labels_per_worker(&[], 2).expect("ok"), vec!["", ""]);
        assert_eq!(
            labels_per_worker(&["a=1".into()], 2).expect("ok"),
            vec!["a=1", "a=1"]
        );
        assert_eq!(
            labels_per_worker(&["a=1".into(), "b=2".into()], 3).expect("ok"),
            vec!["a=1", "b=2", ""]
        );
        assert!(labels_per_worker(&["a=1".into(), "b=2".into()], 1).is_err());
        assert!(labels_per_worker(&["nokey".into()], 1).is_err());
    }

    #[test]
    fn parses_label_lists() {
        let labels = parse_labels("gpu=true, zone=eu ,").expect("labels");
        assert_eq!(labels.get("gpu").map(String::as_str), Some("true"));
        assert_eq!(labels.get("zone").map(String::as_str), Some("eu"));
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("").expect("empty").is_empty());
    }
}
