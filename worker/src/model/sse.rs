//! A small Server-Sent Events decoder (the subset model APIs use: `event:` and `data:` lines,
//! events ended by a blank line, `\n` or `\r\n` line ends).

use futures::{Stream, StreamExt as _, stream::BoxStream};

use super::ModelError;

/// One event.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Largest event accepted, in bytes (a model never sends one this big; a broken server might).
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Splits a response body into events. A transport error mid-body is [`ModelError::StreamCut`].
pub(crate) fn events(
    response: reqwest::Response,
) -> BoxStream<'static, Result<SseEvent, ModelError>> {
    decode(response.bytes_stream().map(|chunk| {
        chunk
            .map(|b| b.to_vec())
            .map_err(|e| ModelError::StreamCut(super::error_chain(&e)))
    }))
}

impl From<&str> for SseEvent {
    fn from(data: &str) -> Self {
        Self {
            event: None,
            data: data.to_owned(),
        }
    }
}

fn decode<S>(body: S) -> BoxStream<'static, Result<SseEvent, ModelError>>
where
    S: Stream<Item = Result<Vec<u8>, ModelError>> + Send + 'static,
{
    let state = (Box::pin(body), Vec::<u8>::new(), false);
    futures::stream::unfold(state, |(mut body, mut buf, mut done)| async move {
        loop {
            if let Some(event) = take_event(&mut buf) {
                return Some((Ok(event), (body, buf, done)));
            }
            if done {
                return None;
            }
            match body.next().await {
                Some(Ok(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    if buf.len() > MAX_EVENT_BYTES {
                        done = true;
                        buf.clear();
                        let err = ModelError::Protocol(format!(
                            "a server-sent event exceeds {MAX_EVENT_BYTES} bytes"
                        ));
                        return Some((Err(err), (body, buf, done)));
                    }
                }
                Some(Err(err)) => {
                    done = true;
                    buf.clear();
                    return Some((Err(err), (body, buf, done)));
                }
                None => {
                    // A last event without its blank line still counts.
                    done = true;
                    if buf.iter().any(|b| !b.is_ascii_whitespace()) {
                        buf.extend_from_slice(b"\n\n");
                    }
                }
            }
        }
    })
    .boxed()
}

/// Removes and parses the first complete event in `buf`, skipping events with no data.
fn take_event(buf: &mut Vec<u8>) -> Option<SseEvent> {
    loop {
        let end = find_blank_line(buf)?;
        let raw: Vec<u8> = buf.drain(..end.1).collect();
        let text = String::from_utf8_lossy(&raw[..end.0]);
        let mut event = SseEvent::default();
        let mut has_data = false;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.event = Some(value.to_owned()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        if has_data {
            return Some(event);
        }
    }
}

/// (end of the event text, end of its terminator) of the first blank line.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_split_across_chunks_and_crlf() {
        let chunks = vec![
            Ok(b"event: a\r\nda".to_vec()),
            Ok(b"ta: one\r\n\r\n: comment\n\ndata: x\ndata: y\n".to_vec()),
            Ok(b"\ndata: tail".to_vec()),
        ];
        let got: Vec<_> = decode(futures::stream::iter(chunks))
            .map(|e| e.expect("event"))
            .collect()
            .await;
        assert_eq!(
            got,
            [
                SseEvent {
                    event: Some("a".into()),
                    data: "one".into()
                },
                SseEvent {
                    event: None,
                    data: "x\ny".into()
                },
                SseEvent {
                    event: None,
                    data: "tail".into()
                },
            ]
        );
    }
}
