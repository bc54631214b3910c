//! Checks and conversions at the edge, shared by every adapter (gRPC today, MCP and agent turns
//! next): label selectors and paging parameters. The core receives checked values.

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

/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The number of items a page holds: `requested`, 0 meaning [`DEFAULT_PAGE_SIZE`], capped at
/// [`MAX_PAGE_SIZE`].
pub fn page_limit(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// The position after which a page starts: `None` for an empty token (the first page), the
/// decoded position otherwise, INVALID_ARGUMENT for a token this server did not issue.
pub fn page_after<T>(
    token: &str,
    decode: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    decode(token).map(Some).ok_or_else(|| {
        Error::Status(errors::invalid_argument(
            "page_token",
            "page_token is not one this server issued: pass next_page_token unchanged, or \
             leave it empty for the first page",
        ))
    })
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
