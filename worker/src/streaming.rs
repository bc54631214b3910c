//! WorkerService.CallToolStream: the tool runs in a named task that forwards its live output
//! as `output` events and ends with one `result` event (or an error status). When the caller
//! goes away (the stream is dropped) the task stops, dropping the tool call, which kills the
//! command's processes. A call with a request id is claimed first (see [`crate::applied`]): a
//! replay is a stream of one result; a call stopped because its caller went away is recorded
//! as of unknown outcome.

use std::{sync::Arc, time::Duration};

use heist_proto::v1::{self, tool_event};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{Instrument as _, debug, info_span};

use crate::{
    applied,
    sandbox::{Chunk, Stream},
    state::{State, settle},
};

/// Events buffered between the tool task and the gRPC stream.
const EVENT_BUFFER: usize = 16;
/// Output chunks buffered between the command and the tool task.
const CHUNK_BUFFER: usize = 16;

impl State {
    /// Starts a streaming tool call; the returned stream yields its events.
    pub fn call_tool_stream(
        self: &Arc<Self>,
        request: v1::CallToolRequest,
        deadline: Option<Duration>,
    ) -> ReceiverStream<Result<v1::ToolEvent, Status>> {
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let span = info_span!(
            "call-tool-stream",
            session_id = %request.session_id,
            tool = %request.tool
        );
        let state = Arc::clone(self);
        self.tasks.spawn(
            async move {
                let _call = state.inflight.enter();
                let claim = match state.claim(&request).await {
                    Ok(None) => None,
                    Ok(Some(applied::Begin::Run(mut claim))) => {
                        claim.start();
                        Some(claim)
                    }
                    Ok(Some(applied::Begin::Replay(response))) => {
                        let _ = events.send(Ok(result_event(response))).await;
                        return;
                    }
                    Err(err) => {
                        let _ = events.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let (chunks, mut output) = mpsc::channel(CHUNK_BUFFER);
                let run = state.run_tool(request, deadline, Some(chunks));
                tokio::pin!(run);
                let result = loop {
                    tokio::select! {
                        result = &mut run => break result,
                        Some(chunk) = output.recv() => {
                            if events.send(Ok(output_event(chunk))).await.is_err() {
                                debug!("caller went away: stopping the tool");
                                return;
                            }
                        }
                        () = events.closed() => {
                            debug!("caller went away: stopping the tool");
                            return;
                        }
                    }
                };
                while let Ok(chunk) = output.try_recv() {
                    if events.send(Ok(output_event(chunk))).await.is_err() {
                        return;
                    }
                }
                let result = match claim {
                    Some(claim) => settle(claim, result).await,
                    None => result,
                };
                let last = result.map_err(Status::from).map(result_event);
                let _ = events.send(last).await;
            }
            .instrument(span),
        );
        ReceiverStream::new(rx)
    }
}

/// The final result as a wire event.
fn result_event(response: v1::CallToolResponse) -> v1::ToolEvent {
    v1::ToolEvent {
        event: Some(tool_event::Event::Result(response)),
    }
}

/// A live output chunk as a wire event.
fn output_event(chunk: Chunk) -> v1::ToolEvent {
    let stream = match chunk.stream {
        Stream::Stdout => v1::OutputStream::Stdout,
        Stream::Stderr => v1::OutputStream::Stderr,
    };
    v1::ToolEvent {
        event: Some(tool_event::Event::Output(v1::OutputChunk {
            stream: stream as i32,
            data: chunk.data,
        })),
    }
}
