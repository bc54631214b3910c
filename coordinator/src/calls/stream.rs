//! A streamed tool call: the same admission, gate and request-id rule as a unary call, then the
//! worker's events forwarded as they arrive (output chunks, then the result, stamped with the
//! worker id). The whole stream is bounded by the call's deadline; past it the stream ends with
//! DEADLINE_EXCEEDED. Dropping the stream cancels the worker's stream, which kills the command.
//!
//! A replay (same request id, same arguments) is a stream of one event: the first call's
//! result, with `replayed` set. Only a call that reached its result is recorded, and the
//! after-hooks run when the result arrives. The `tool.executed` audit record is written when
//! the stream ends: with the result (before its request-id record), with the failure, or, when
//! the caller drops the stream first, as `cancelled`.

use std::sync::Arc;

use futures::{StreamExt as _, stream::BoxStream};
use heist_proto::{
    ids::WorkerId,
    v1::{CallToolResponse, ToolEvent, tool_event},
};
use tonic::Status;

use super::{Admitted, ToolCall, admit, audited::Execution, hooks, replayed};
use crate::{
    app::App,
    error::Error,
    runner::{self, Recorder, Started},
};

/// The events of a streamed call.
pub type ToolEvents = BoxStream<'static, Result<ToolEvent, Error>>;

/// Admits and gates the call and starts it on the session's worker.
pub async fn call_stream(app: &Arc<App>, call: ToolCall) -> Result<ToolEvents, Error> {
    let Admitted {
        worker,
        route,
        read_only,
        dedup,
    } = admit(app, &call)?;
    let started = runner::begin(&app.idempotency, dedup)
        .await
        .map_err(|err| app.store.refusal_for(err))?;
    let record = match started {
        Started::Replay(bytes) => {
            let event = result_event(replayed(&bytes)?);
            return Ok(futures::stream::once(async move { Ok(event) }).boxed());
        }
        Started::Run(record) => record,
    };
    let execution = Execution::start(app, &call, read_only, "stream");
    let events = route
        .client
        .call_tool_stream(&call.principal.id, call.deadline, call.to_request())
        .await;
    let events = match events {
        Ok(events) => events,
        Err(err) => {
            execution.finish(Err(&err), false).await;
            return Err(err);
        }
    };
    let forward = Forward {
        app: Arc::clone(app),
        call,
        read_only,
        worker,
        events,
        record,
        execution: Some(execution),
        done: false,
    };
    Ok(futures::stream::unfold(forward, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
    .boxed())
}

/// The state of one forwarded stream.
struct Forward {
    app: Arc<App>,
    call: ToolCall,
    read_only: bool,
    worker: WorkerId,
    events: ToolEvents,
    /// Completed with the result when the call has a request id.
    record: Option<Recorder>,
    /// The call's audit record, written once when the stream ends.
    execution: Option<Execution>,
    done: bool,
}

impl Forward {
    /// The next event to send, or `None` once the stream has ended.
    async fn next(&mut self) -> Option<Result<ToolEvent, Error>> {
        if self.done {
            return None;
        }
        let next = tokio::time::timeout_at(self.call.deadline, self.events.next()).await;
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
        if let (Err(err), Some(execution)) = (&event, self.execution.take()) {
            execution.finish(Err(err), self.record.is_some()).await;
        }
        if let (Err(err), Some(record)) = (&event, self.record.take())
            && let Err(settle) = record.fail(err).await
        {
            return Some(Err(settle));
        }
        Some(event)
    }

    /// Stamps the result, records it for its request id, and runs the after-hooks.
    async fn finish(&mut self, mut resp: CallToolResponse) -> Result<CallToolResponse, Error> {
        resp.worker_id = self.worker.to_string();
        if let Some(execution) = self.execution.take() {
            execution.finish(Ok(&resp), self.record.is_some()).await;
        }
        if let Some(record) = self.record.take() {
            record.complete(&resp).await?;
        }
        hooks::after(&self.app, &self.call, self.read_only, &resp).await;
        Ok(resp)
    }
}

impl Drop for Forward {
    /// A stream dropped before its end: the call is recorded as cancelled.
    fn drop(&mut self) {
        if let Some(execution) = self.execution.take() {
            execution.cancelled();
        }
    }
}

fn result_event(resp: CallToolResponse) -> ToolEvent {
    ToolEvent {
        event: Some(tool_event::Event::Result(resp)),
    }
}
