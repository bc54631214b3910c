//! The one idempotent runner: begin → run → complete → replay, for every mutating call that
//! carries a client request id (session create and close, tool calls unary and streamed,
//! checkpoint create, restore, fork and delete).
//!
//! [`run_once`] is the whole protocol for a call whose result is one value: it claims the
//! request id (or replays the recorded response), runs the body in a tracked task (so a caller
//! that gives up never leaves a half-recorded call behind), and records the result. A call whose
//! result arrives at the end of a stream uses the two halves, [`begin`] and
//! [`Recorder::complete`], itself.

use std::future::Future;

use heist_proto::ids::RequestId;
use prost::Message;

use crate::{
    app::App,
    error::Error,
    idempotency::{self, Begin, Guard, Idempotency},
};

/// What makes two calls the same call: principal, method, request id, and the fingerprint of
/// the request (the same id with another fingerprint is REQUEST_ID_REUSED).
#[derive(Clone, Debug)]
pub struct Dedup {
    /// Who calls.
    pub principal: String,
    /// The method's name (calls of different methods never collide).
    pub method: &'static str,
    /// The client's request id.
    pub request_id: RequestId,
    /// BLAKE3 of the request's canonical form (see [`idempotency::Fingerprint`]).
    pub fingerprint: [u8; 32],
    /// What the call reserves in its intent record (e.g. a new session's id); a retry that
    /// resumes the call gets the first call's reservation instead.
    pub intent: Vec<u8>,
}

impl Dedup {
    /// A dedup key when the caller gave a request id; `None` runs the call without one.
    pub fn new(
        principal: &str,
        method: &'static str,
        request_id: Option<RequestId>,
        fingerprint: [u8; 32],
    ) -> Option<Self> {
        request_id.map(|request_id| Self {
            principal: principal.to_owned(),
            method,
            request_id,
            fingerprint,
            intent: Vec::new(),
        })
    }

    /// The same key, reserving `intent` when the call begins.
    pub fn with_intent(mut self, intent: Vec<u8>) -> Self {
        self.intent = intent;
        self
    }
}

/// How a call starts.
pub enum Started {
    /// A previous call with this request id succeeded: its encoded response.
    Replay(Vec<u8>),
    /// Run the call; complete the recorder (when there is one) with the result.
    Run(Option<Recorder>),
}

/// The right to record the result of a call with a request id. Dropping it records nothing,
/// so the call can be retried.
pub struct Recorder {
    guard: Guard,
    fingerprint: [u8; 32],
}

impl Recorder {
    /// Records `out` (flushed) as the response to replay for this request id.
    pub async fn complete<T: Message>(self, out: &T) -> Result<(), Error> {
        self.guard
            .complete(self.fingerprint, out.encode_to_vec())
            .await
    }

    /// What the call reserved (see [`Dedup::intent`]).
    pub fn intent(&self) -> &[u8] {
        self.guard.intent()
    }

    /// Settles a failed call: a definite failure forgets the intent (the id can be retried
    /// with anything); one whose outcome is unknown keeps it, so a retry resumes the call.
    pub async fn fail(self, err: &Error) -> Result<(), Error> {
        if err.outcome_unknown() {
            return Ok(());
        }
        self.guard.abandon().await
    }
}

/// Claims the request id of `dedup` (waiting for a running duplicate), or says to replay.
pub async fn begin(table: &Idempotency, dedup: Option<Dedup>) -> Result<Started, Error> {
    let Some(d) = dedup else {
        return Ok(Started::Run(None));
    };
    let key = idempotency::key(&d.principal, d.method, &d.request_id);
    Ok(
        match table
            .begin(key, d.fingerprint, &d.request_id, d.intent)
            .await?
        {
            Begin::Replay(bytes) => Started::Replay(bytes),
            Begin::Run(guard) => Started::Run(Some(Recorder {
                guard,
                fingerprint: d.fingerprint,
            })),
        },
    )
}

/// Runs `body` at most once per request id: a retry replays the stored response through
/// `replay`. The body runs in a task tracked by the server (in the caller's span), so it
/// finishes and is recorded even when the caller stops waiting.
pub async fn run_once<T, Fut>(
    app: &App,
    dedup: Option<Dedup>,
    replay: impl FnOnce(&App, &[u8]) -> Result<T, Error>,
    body: Fut,
) -> Result<T, Error>
where
    T: Message + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    run_once_with(app, dedup, replay, |_| body).await
}

/// [`run_once`] for a body that needs what its intent reserved: `make_body` gets the
/// reservation (the first call's, when this call resumes one), or `None` without a request id.
pub async fn run_once_with<T, Fut>(
    app: &App,
    dedup: Option<Dedup>,
    replay: impl FnOnce(&App, &[u8]) -> Result<T, Error>,
    make_body: impl FnOnce(Option<Vec<u8>>) -> Fut,
) -> Result<T, Error>
where
    T: Message + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    // A full store refuses the call here, before its intent is written or anything applied.
    app.store.writable()?;
    let started = begin(&app.idempotency, dedup)
        .await
        .map_err(|err| app.store.refusal_for(err))?;
    let recorder = match started {
        Started::Replay(bytes) => return replay(app, &bytes),
        Started::Run(recorder) => recorder,
    };
    let body = make_body(recorder.as_ref().map(|r| r.intent().to_vec()));
    app.tasks
        .spawn(heist_proto::trace::in_current(async move {
            match body.await {
                Ok(out) => {
                    if let Some(recorder) = recorder {
                        recorder.complete(&out).await?;
                    }
                    Ok(out)
                }
                Err(err) => {
                    if let Some(recorder) = recorder {
                        recorder.fail(&err).await?;
                    }
                    Err(err)
                }
            }
        }))
        .await?
}

/// Decodes a recorded response.
pub fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T, Error> {
    T::decode(bytes).map_err(|source| Error::Corrupt {
        what: "idempotency",
        source,
    })
}
