//! Newtype ids. Ids cross the wire as strings; inside the code they never travel bare.

use std::fmt;

use crate::errors;

/// A malformed id: which field, and what was given. Independent of the transport; it becomes
/// INVALID_ARGUMENT with reason INVALID_FIELD at the gRPC edge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {raw:?} is not valid: use 1 to 128 characters from A-Z a-z 0-9 . _ : -")]
pub struct IdError {
    /// The field the id came in (`session_id`, `worker_id`, ...).
    pub field: &'static str,
    /// What was given.
    pub raw: String,
}

impl IdError {
    /// The message, as a status would carry it.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl From<IdError> for tonic::Status {
    fn from(err: IdError) -> Self {
        errors::invalid_argument(err.field, err.to_string())
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id after checking it is well formed (1..=128 chars of `[A-Za-z0-9._:-]`).
            pub fn parse(raw: impl Into<String>) -> Result<Self, IdError> {
                let raw = raw.into();
                if is_valid(&raw) {
                    Ok(Self(raw))
                } else {
                    Err(IdError { field: $what, raw })
                }
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string (for building messages).
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// Stable id of a worker (WORKER_ID).
    WorkerId,
    "worker_id"
);
string_id!(
    /// Id of a session: `s-` followed by a UUIDv7, so ids sort by creation time.
    SessionId,
    "session_id"
);
string_id!(
    /// A client request id that makes retries of a mutating call safe.
    RequestId,
    "request_id"
);
string_id!(
    /// Id of a checkpoint: `c-` followed by a UUIDv7, so ids sort by creation time.
    CheckpointId,
    "checkpoint_id"
);

string_id!(
    /// Id of an API client: the `sub` of its tokens, the principal owning its sessions.
    ClientId,
    "client_id"
);

string_id!(
    /// Id of an agent turn: `t-` followed by a UUIDv7, so ids sort by start time.
    TurnId,
    "turn_id"
);

impl TurnId {
    /// A fresh, time-ordered turn id.
    pub fn generate() -> Self {
        Self(format!("t-{}", uuid::Uuid::now_v7()))
    }
}

impl SessionId {
    /// A fresh, time-ordered session id.
    pub fn generate() -> Self {
        Self(format!("s-{}", uuid::Uuid::now_v7()))
    }
}

impl CheckpointId {
    /// A fresh, time-ordered checkpoint id.
    pub fn generate() -> Self {
        Self(format!("c-{}", uuid::Uuid::now_v7()))
    }
}

impl RequestId {
    /// Parses an optional request id: empty means "no retry protection".
    pub fn parse_optional(raw: &str) -> Result<Option<Self>, IdError> {
        if raw.is_empty() {
            Ok(None)
        } else {
            Self::parse(raw).map(Some)
        }
    }
}

fn is_valid(raw: &str) -> bool {
    (1..=128).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_path_like_and_empty_values() {
        assert!(SessionId::parse("s-0193").is_ok());
        for bad in ["", "../etc", "a/b", "a b", "x\0y", &"a".repeat(129)] {
            let err = SessionId::parse(bad).expect_err(bad);
            assert_eq!(err.field, "session_id");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn generated_session_ids_are_valid_and_ordered() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert!(SessionId::parse(a.as_str()).is_ok());
        assert!(a < b);
        let c = CheckpointId::generate();
        let d = CheckpointId::generate();
        assert!(c.as_str().starts_with("c-"));
        assert!(CheckpointId::parse(c.as_str()).is_ok());
        assert!(c < d);
    }
}
