//! A model server in the test process: it speaks the OpenAI and Anthropic wire protocols with
//! replies queued by each test, and records what it received.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::Response,
    routing::post,
};
use serde_json::Value as Json;

/// One reply.
pub enum Reply {
    /// An SSE body of these `data:` payloads (`(event, data)` for Anthropic).
    Sse(Vec<(Option<&'static str>, String)>),
    /// An error status with an optional `Retry-After` (seconds).
    Status(u16, Option<&'static str>),
    /// Never answers.
    Hang,
}

/// What a request carried.
pub struct Seen {
    /// The JSON body.
    pub body: Json,
    /// The headers.
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Inner {
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
}

/// A running server.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Starts a server on 127.0.0.1:0 answering with `replies`, in order (then 500s).
    pub async fn start(replies: Vec<Reply>) -> Self {
        let inner = Arc::new(Inner {
            replies: Mutex::new(replies.into()),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/messages", post(handle))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { inner, url }
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        self.inner.seen.lock().expect("lock").len()
    }

    /// Runs `f` on request `i`.
    pub fn seen<T>(&self, i: usize, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.inner.seen.lock().expect("lock")[i])
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(Json::Null);
    inner
        .seen
        .lock()
        .expect("lock")
        .push(Seen { body, headers });
    let reply = inner
        .replies
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(Reply::Status(500, None));
    match reply {
        Reply::Sse(events) => sse(events),
        Reply::Status(code, retry_after) => {
            let mut response =
                Response::builder().status(StatusCode::from_u16(code).expect("status"));
            if let Some(after) = retry_after {
                response = response.header(header::RETRY_AFTER, after);
            }
            response
                .body(Body::from("{\"error\": {\"message\": \"try later\"}}"))
                .expect("response")
        }
        Reply::Hang => std::future::pending().await,
    }
}

fn sse(events: Vec<(Option<&'static str>, String)>) -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = events
        .into_iter()
        .map(|(event, data)| {
            let head = event.map(|e| format!("event: {e}\n")).unwrap_or_default();
            Ok(Bytes::from(format!("{head}data: {data}\n\n")))
        })
        .collect();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .expect("response")
}

/// A server for one request that sends the response head and `data` as one chunk of a chunked
/// body, then closes the connection mid-body. Returns its `http://127.0.0.1:PORT`.
pub async fn cut_after(data: String) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        // Read the whole request first, so closing sends FIN, not RST.
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let body = format!("data: {data}\n\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
            body.len()
        );
        socket.write_all(response.as_bytes()).await.expect("write");
        socket.flush().await.expect("flush");
        socket.shutdown().await.ok();
    });
    url
}
