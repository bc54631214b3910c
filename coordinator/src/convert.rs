//! Checks and conversions at the edge, shared by every adapter (gRPC today, MCP and agent turns
//! next): the protobuf requests of the mutating calls as checked domain requests
//! (`TryFrom<pb::X>`, ids parsed once into newtypes, errors naming the field), label selectors
//! and paging parameters. The core receives checked values.

use std::collections::HashMap;

use heist_proto::{
    ids::{CheckpointId, RequestId, SessionId},
    v1::{
        CloseSessionRequest, CreateCheckpointRequest, CreateSessionRequest,
        DeleteCheckpointRequest, ForkSessionRequest, RestoreCheckpointRequest,
    },
};

use heist_proto::errors;

use crate::error::Error;

/// CreateSession, checked.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The label selector placement must satisfy (checked by [`validate_labels`]).
    pub labels: HashMap<String, String>,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
    /// The session's tool policy as asked for (checked against the tools that exist when the
    /// session is created: [`crate::calls::policy::check`]); empty for none.
    pub allowed_tools: Vec<String>,
}

impl TryFrom<CreateSessionRequest> for NewSession {
    type Error = Error;

    fn try_from(req: CreateSessionRequest) -> Result<Self, Error> {
        validate_labels(&req.labels)?;
        Ok(Self {
            request_id: RequestId::parse_optional(&req.request_id)?,
            labels: req.labels,
            allowed_tools: req.allowed_tools,
        })
    }
}

/// CloseSession, checked.
#[derive(Clone, Debug)]
pub struct CloseSession {
    /// The session to close.
    pub session: SessionId,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
}

impl TryFrom<CloseSessionRequest> for CloseSession {
    type Error = Error;

    fn try_from(req: CloseSessionRequest) -> Result<Self, Error> {
        Ok(Self {
            session: SessionId::parse(req.session_id)?,
            request_id: RequestId::parse_optional(&req.request_id)?,
        })
    }
}

/// CreateCheckpoint, checked.
#[derive(Clone, Debug)]
pub struct NewCheckpoint {
    /// The session to capture.
    pub session: SessionId,
    /// Labels for the checkpoint (checked by [`validate_labels`]).
    pub labels: HashMap<String, String>,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
}

impl TryFrom<CreateCheckpointRequest> for NewCheckpoint {
    type Error = Error;

    fn try_from(req: CreateCheckpointRequest) -> Result<Self, Error> {
        validate_labels(&req.labels)?;
        Ok(Self {
            session: SessionId::parse(req.session_id)?,
            request_id: RequestId::parse_optional(&req.request_id)?,
            labels: req.labels,
        })
    }
}

/// RestoreCheckpoint, checked.
#[derive(Clone, Debug)]
pub struct Restore {
    /// The checkpoint to restore.
    pub checkpoint: CheckpointId,
    /// The session to restore into; `None` for the one the checkpoint was taken from.
    pub target: Option<SessionId>,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
}

impl TryFrom<RestoreCheckpointRequest> for Restore {
    type Error = Error;

    fn try_from(req: RestoreCheckpointRequest) -> Result<Self, Error> {
        Ok(Self {
            checkpoint: CheckpointId::parse(req.checkpoint_id)?,
            target: optional_session(&req.session_id)?,
            request_id: RequestId::parse_optional(&req.request_id)?,
        })
    }
}

/// ForkSession, checked.
#[derive(Clone, Debug)]
pub struct Fork {
    /// The checkpoint to fork.
    pub checkpoint: CheckpointId,
    /// The new session's label selector (checked by [`validate_labels`]).
    pub labels: HashMap<String, String>,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
}

impl TryFrom<ForkSessionRequest> for Fork {
    type Error = Error;

    fn try_from(req: ForkSessionRequest) -> Result<Self, Error> {
        validate_labels(&req.labels)?;
        Ok(Self {
            checkpoint: CheckpointId::parse(req.checkpoint_id)?,
            request_id: RequestId::parse_optional(&req.request_id)?,
            labels: req.labels,
        })
    }
}

/// DeleteCheckpoint, checked.
#[derive(Clone, Debug)]
pub struct DeleteCheckpoint {
    /// The checkpoint to delete.
    pub checkpoint: CheckpointId,
    /// Makes a retry apply once.
    pub request_id: Option<RequestId>,
}

impl TryFrom<DeleteCheckpointRequest> for DeleteCheckpoint {
    type Error = Error;

    fn try_from(req: DeleteCheckpointRequest) -> Result<Self, Error> {
        Ok(Self {
            checkpoint: CheckpointId::parse(req.checkpoint_id)?,
            request_id: RequestId::parse_optional(&req.request_id)?,
        })
    }
}

/// An optional session id: empty means none.
pub fn optional_session(raw: &str) -> Result<Option<SessionId>, Error> {
    match raw {
        "" => Ok(None),
        raw => Ok(Some(SessionId::parse(raw)?)),
    }
}

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

    #[test]
    fn requests_become_domain_values_or_name_the_bad_field() {
        let req = CreateCheckpointRequest {
            session_id: "s-1".to_owned(),
            labels: labels(&[("k", "v")]),
            request_id: String::new(),
        };
        let ok = NewCheckpoint::try_from(req.clone()).expect("valid");
        assert_eq!(ok.session.as_str(), "s-1");
        assert!(ok.request_id.is_none());

        let bad_id = CreateCheckpointRequest {
            session_id: "../x".to_owned(),
            ..req.clone()
        };
        let status = tonic::Status::from(NewCheckpoint::try_from(bad_id).expect_err("bad id"));
        assert!(
            status.message().contains("session_id"),
            "{}",
            status.message()
        );

        let bad_labels = CreateCheckpointRequest {
            labels: labels(&[("a b", "v")]),
            ..req
        };
        assert!(NewCheckpoint::try_from(bad_labels).is_err());
        assert!(
            Restore::try_from(RestoreCheckpointRequest {
                checkpoint_id: "c-1".to_owned(),
                ..RestoreCheckpointRequest::default()
            })
            .expect("restore")
            .target
            .is_none()
        );
    }
}
