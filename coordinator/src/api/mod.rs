//! The public gRPC services. Each handler unpacks the request, calls an inner function that
//! works on [`crate::app::App`], and maps the error to a status.

pub mod auth;
pub mod blob;
pub mod checkpoint;
pub mod cluster;
pub mod session;
pub mod tool;
pub mod tool_stream;

use std::collections::HashMap;

use heist_proto::errors;

use crate::error::Error;

/// Most labels a session may carry.
const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in bytes.
const MAX_LABEL_VALUE: usize = 255;

/// Checks a label selector: a bounded number of short keys of `[A-Za-z0-9._/-]` and short values.
pub fn validate_labels(labels: &HashMap<String, String>) -> Result<(), Error> {
    let bad = |msg: String| Err(Error::Status(errors::invalid_argument("labels", msg)));
    if labels.len() > MAX_LABELS {
        return bad(format!(
            "{} labels given; at most {MAX_LABELS} are allowed",
            labels.len()
        ));
    }
    for (k, v) in labels {
        let key_ok = (1..=MAX_LABEL_KEY).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return bad(format!(
                "label key {k:?} is not valid: use 1 to {MAX_LABEL_KEY} characters from \
                 A-Z a-z 0-9 . _ - /"
            ));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return bad(format!(
                "label {k:?} has a value longer than {MAX_LABEL_VALUE} bytes or with control \
                 characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn accepts_ordinary_labels_and_refuses_odd_ones() {
        assert!(validate_labels(&labels(&[("gpu", "a100"), ("zone/x", "eu-1")])).is_ok());
        assert!(validate_labels(&labels(&[("", "x")])).is_err());
        assert!(validate_labels(&labels(&[("a b", "x")])).is_err());
        assert!(validate_labels(&labels(&[("k", "new\nline")])).is_err());
        let many: HashMap<String, String> =
            (0..40).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).is_err());
    }
}
