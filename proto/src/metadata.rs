//! Metadata keys and deadline propagation.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Bearer credentials: `authorization: Bearer <jwt>`.
pub const AUTHORIZATION: &str = "authorization";
/// Join token a worker presents when it opens the control stream.
pub const JOIN_TOKEN: &str = "x-heist-join-token";
/// Worker id a worker names on its BlobService calls.
pub const WORKER_ID: &str = "x-heist-worker-id";
/// The worker's identity proof on a BlobService call (see [`crate::identity::Proof::to_header`]).
pub const WORKER_PROOF: &str = "x-heist-worker-proof";
/// Principal on whose behalf the coordinator calls a worker (informational, for logs).
pub const PRINCIPAL: &str = "x-heist-principal";
/// The gRPC deadline header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The bearer token in `authorization`, if the header is present and well formed.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    bearer(metadata.as_ref())
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive, token not
/// empty), for gRPC metadata and plain HTTP alike.
pub fn bearer(headers: &tonic::codegen::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The caller's remaining deadline, parsed from `grpc-timeout` (e.g. `100m`, `5S`).
pub fn remaining_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Copies the caller's remaining deadline (if any) onto an outgoing request, capped at `cap`.
pub fn forward_deadline<T>(
    incoming: &MetadataMap,
    outgoing: &mut tonic::Request<T>,
    cap: Duration,
) {
    let deadline = remaining_deadline(incoming).map_or(cap, |d| d.min(cap));
    outgoing.set_timeout(deadline);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let mut md = MetadataMap::new();
        for (raw, want) in [
            ("100m", Duration::from_millis(100)),
            ("5S", Duration::from_secs(5)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            md.insert(GRPC_TIMEOUT, raw.parse().expect("ascii"));
            assert_eq!(remaining_deadline(&md), Some(want), "{raw}");
        }
        md.insert(GRPC_TIMEOUT, "12x".parse().expect("ascii"));
        assert_eq!(remaining_deadline(&md), None);
    }

    #[test]
    fn extracts_bearer_token() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer_token(&md), None);
        md.insert(AUTHORIZATION, "Bearer abc.def.ghi".parse().expect("ascii"));
        assert_eq!(bearer_token(&md), Some("abc.def.ghi"));
        md.insert(AUTHORIZATION, "Basic xyz".parse().expect("ascii"));
        assert_eq!(bearer_token(&md), None);
    }
}
