//! ToolService.CallToolStream: the same checks as CallTool (the caller owns the session, it is
//! READY, its worker has the tool; a request id makes a call to a mutating tool run at most
//! once), then the worker's events forwarded as they arrive: output chunks, then the result,
//! stamped with the worker id. The whole stream is bounded by the caller's deadline (capped by
//! HEIST_WORKER_CALL_TIMEOUT_S); past it the stream ends with DEADLINE_EXCEEDED. A caller that
//! cancels drops the stream, which cancels the worker's stream, which kills the command.
//!
//! A replay (same request id, same arguments) is a stream of one event: the first call's
//! result, with `replayed` set. Only a call that reached its result is recorded.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _, stream::BoxStream};
use heist_proto::{
    ids::WorkerId,
    v1::{CallToolRequest, CallToolResponse, ToolEvent, tool_event},
};
use prost::Message as _;
use tokio::time::Instant;
use tonic::Status;

use super::tool::{Admitted, admit, fingerprint, replayed};
use crate::{
    app::App,
    error::Error,
    idempotency::{self, Begin, Guard},
};

/// What CallToolStream answers with.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ToolEvent, Status>> + Send>>;

/// Idempotency method name (the same as CallTool's: a streamed call and a unary call with the
/// same request id are the same call).
const CALL: &str = "CallTool";

/// Checks the call and starts it on the session's worker.
pub async fn call_tool_stream(
    app: &Arc<App>,
    owner: String,
    deadline: Instant,
    req: CallToolRequest,
) -> Result<EventStream, Error> {
    let Admitted {
        worker,
        route,
        request_id,
        ..
    } = admit(app, &owner, &req)?;
    let mut record = None;
    if let Some(request_id) = request_id {
        let print = fingerprint(&req);
        let key = idempotency::key(&owner, CALL, &request_id);
        match app.idempotency.begin(key, print, &request_id).await? {
            Begin::Replay(bytes) => {
                let event = result_event(replayed(&bytes)?);
                return Ok(Box::pin(futures::stream::once(async move { Ok(event) })));
            }
            Begin::Run(guard) => record = Some((guard, print)),
        }
    }
    let events = route
        .client
        .call_tool_stream(&owner, deadline, req.clone())
        .await?;
    let forward = Forward {
        app: Arc::clone(app),
        owner,
        session: req.session_id,
        tool: req.tool,
        worker,
        events,
        deadline,
        record,
        done: false,
    };
    Ok(Box::pin(futures::stream::unfold(
        forward,
        |mut f| async move {
            let item = f.next().await?;
            Some((item.map_err(Status::from), f))
        },
    )))
}

/// The state of one forwarded stream.
struct Forward {
    app: Arc<App>,
    owner: String,
    session: String,
    tool: String,
    worker: WorkerId,
    events: BoxStream<'static, Result<ToolEvent, Error>>,
    deadline: Instant,
    /// The idempotency record to complete with the result.
    record: Option<(Guard, [u8; 32])>,
    done: bool,
}

impl Forward {
    /// The next event to send, or `None` once the stream has ended.
    async fn next(&mut self) -> Option<Result<ToolEvent, Error>> {
        if self.done {
            return None;
        }
        let next = tokio::time::timeout_at(self.deadline, self.events.next()).await;
        let event = match next {
            Err(_) => Err(Error::DeadlineExceeded(self.worker.clone())),
            Ok(None) => Err(Error::Status(Status::unavailable(format!(
                "worker {} ended the stream without a result: retry the call",
                self.worker
            )))),
            Ok(Some(Err(err))) => Err(err),
            Ok(Some(Ok(ToolEvent {
                event: Some(tool_event::Event::Result(resp)),
            }))) => self.finish(resp).await.map(result_event),
            Ok(Some(Ok(event))) => return Some(Ok(event)),
        };
        self.done = true;
        Some(event)
    }

    /// Stamps the result, records it for its request id, and takes an automatic checkpoint
    /// when the coordinator is configured to.
    async fn finish(&mut self, mut resp: CallToolResponse) -> Result<CallToolResponse, Error> {
        resp.worker_id = self.worker.to_string();
        resp.replayed = false;
        if let Some((guard, print)) = self.record.take() {
            guard.complete(print, resp.encode_to_vec()).await?;
        }
        super::checkpoint::after_tool_call(
            &self.app,
            &self.owner,
            &self.session,
            &self.tool,
            &resp,
            self.deadline,
        )
        .await;
        Ok(resp)
    }
}

fn result_event(resp: CallToolResponse) -> ToolEvent {
    ToolEvent {
        event: Some(tool_event::Event::Result(resp)),
    }
}
