//! Malformed request bodies are the caller's fault: tonic answers a message that does not decode
//! with INTERNAL ("failed to decode Protobuf message ..."), which tells a client to report a
//! server bug. This layer rewrites that one answer to INVALID_ARGUMENT, leaving every other
//! status alone.

use std::task::{Context, Poll};

use futures::{FutureExt as _, future::Map};
use tower::{Layer, Service};

/// What tonic's prost codec puts at the start of a decode failure's message.
const DECODE_FAILURE: &[u8] = b"failed to decode Protobuf message";

/// Layer wrapping the server in [`DecodeStatus`].
#[derive(Clone, Copy, Default)]
pub struct DecodeStatusLayer;

impl<S> Layer<S> for DecodeStatusLayer {
    type Service = DecodeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeStatus { inner }
    }
}

/// Maps a decode failure's INTERNAL to INVALID_ARGUMENT.
#[derive(Clone)]
pub struct DecodeStatus<S> {
    inner: S,
}

type Fix<R, E> = fn(Result<R, E>) -> Result<R, E>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DecodeStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Map<S::Future, Fix<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        self.inner
            .call(request)
            .map(|result| result.map(fix) as Result<_, _>)
    }
}

/// A trailers-only INTERNAL whose message says the request did not decode becomes
/// INVALID_ARGUMENT (code 3).
fn fix<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    let decode = headers.get("grpc-message").is_some_and(|v| {
        // grpc-message is percent-encoded: spaces arrive as %20.
        let text = v.as_bytes();
        text.starts_with(DECODE_FAILURE) || percent_decoded_prefix(text).starts_with(DECODE_FAILURE)
    });
    if internal && decode {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    response
}

fn percent_decoded_prefix(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DECODE_FAILURE.len());
    let mut i = 0;
    while i < text.len() && out.len() < DECODE_FAILURE.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            let hex = std::str::from_utf8(&text[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, message: &str) -> http::Response<()> {
        http::Response::builder()
            .header("grpc-status", status)
            .header("grpc-message", message)
            .body(())
            .expect("response")
    }

    #[test]
    fn only_decode_failures_change() {
        let fixed = fix(response(
            "13",
            "failed%20to%20decode%20Protobuf%20message: x",
        ));
        assert_eq!(fixed.headers()["grpc-status"], "3");
        let other = fix(response("13", "disk on fire"));
        assert_eq!(other.headers()["grpc-status"], "13");
        let ok = fix(response("0", "failed to decode Protobuf message"));
        assert_eq!(ok.headers()["grpc-status"], "0");
    }
}
