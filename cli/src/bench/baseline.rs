//! The same-run baselines: a plain tonic ToolService that answers `CallTool` like the real `echo`
//! tool (1 hop), and a forwarding proxy in front of it (2 hops, the shape of client ->
//! coordinator -> worker). Each runs as its own process — `heistctl bench serve-baseline` — so
//! the process topology matches the cluster's. The child prints its address on stdout, serves
//! until SIGTERM/SIGINT or until its stdin closes (the parent died), and is killed when the
//! parent drops it.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use heist_proto::v1::{
    self,
    content_block::Block,
    tool_service_client::ToolServiceClient,
    tool_service_server::{ToolService, ToolServiceServer},
};
use prost_types::{Struct, Value, value::Kind};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    net::TcpListener,
    process::{Child, ChildStdin, ChildStdout, Command},
    signal::unix::{SignalKind, signal},
};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};

use super::{failed, machine};
use crate::{client::error_chain, error::Error};

/// How long a baseline process gets to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long it gets to exit after its stdin closes.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Deadline cap the proxy puts on forwarded calls (as the coordinator does).
const FORWARD_CAP: Duration = Duration::from_secs(30);

/// What a baseline process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Answer CallTool itself, with the echo tool's response shape.
    Echo,
    /// Forward every CallTool to `--upstream`.
    Proxy,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Proxy => "proxy",
        }
    }
}

/// Flags of the hidden `heistctl bench serve-baseline` (internal: no env variables).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// `echo` or `proxy`.
    #[arg(long, value_enum)]
    pub role: Role,
    /// The echo server a proxy forwards to, e.g. http://127.0.0.1:40000.
    #[arg(long, required_if_eq("role", "proxy"))]
    pub upstream: Option<String>,
}

/// The CallTool response the real `echo` tool gives for `args`.
pub fn echo_response(args: Struct, worker_id: &str) -> v1::CallToolResponse {
    v1::CallToolResponse {
        content: vec![v1::ContentBlock {
            block: Some(Block::Json(Value {
                kind: Some(Kind::StructValue(args.clone())),
            })),
        }],
        is_error: false,
        structured_content: Some(args),
        worker_id: worker_id.to_owned(),
        duration_us: 0,
        replayed: false,
    }
}

/// The 1-hop server.
struct EchoServer;

#[tonic::async_trait]
impl ToolService for EchoServer {
    async fn list_tools(
        &self,
        _request: Request<v1::ListToolsRequest>,
    ) -> Result<Response<v1::ListToolsResponse>, Status> {
        Ok(Response::new(v1::ListToolsResponse { tools: Vec::new() }))
    }

    async fn call_tool(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<v1::CallToolResponse>, Status> {
        let args = request.into_inner().arguments.unwrap_or_default();
        Ok(Response::new(echo_response(args, "baseline-echo")))
    }

    type CallToolStreamStream = ToolEventStream;

    /// Echo has no incremental output: the stream is the one result event.
    async fn call_tool_stream(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<Self::CallToolStreamStream>, Status> {
        let args = request.into_inner().arguments.unwrap_or_default();
        let event = v1::ToolEvent {
            event: Some(v1::tool_event::Event::Result(echo_response(
                args,
                "baseline-echo",
            ))),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(event)]))))
    }
}

/// Server-streaming response type of the baseline servers.
type ToolEventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::ToolEvent, Status>> + Send>>;

/// The 2-hop server: one channel to the echo server, every call forwarded with its deadline.
struct ProxyServer {
    upstream: ToolServiceClient<Channel>,
}

impl ProxyServer {
    fn forward<T>(incoming: Request<T>) -> Request<T> {
        let metadata = incoming.metadata().clone();
        let mut outgoing = Request::new(incoming.into_inner());
        heist_proto::metadata::forward_deadline(&metadata, &mut outgoing, FORWARD_CAP);
        outgoing
    }
}

#[tonic::async_trait]
impl ToolService for ProxyServer {
    async fn list_tools(
        &self,
        request: Request<v1::ListToolsRequest>,
    ) -> Result<Response<v1::ListToolsResponse>, Status> {
        let response = self
            .upstream
            .clone()
            .list_tools(Self::forward(request))
            .await?;
        Ok(Response::new(response.into_inner()))
    }

    async fn call_tool(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<v1::CallToolResponse>, Status> {
        let response = self
            .upstream
            .clone()
            .call_tool(Self::forward(request))
            .await?;
        Ok(Response::new(response.into_inner()))
    }

    type CallToolStreamStream = ToolEventStream;

    async fn call_tool_stream(
        &self,
        request: Request<v1::CallToolRequest>,
    ) -> Result<Response<Self::CallToolStreamStream>, Status> {
        let response = self
            .upstream
            .clone()
            .call_tool_stream(Self::forward(request))
            .await?;
        Ok(Response::new(Box::pin(response.into_inner())))
    }
}

/// `heistctl bench serve-baseline`: binds 127.0.0.1:0, prints the address, serves until a
/// signal or the end of stdin.
pub async fn serve(args: ServeArgs) -> Result<u8, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("cannot bind 127.0.0.1:0", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the bound address", e))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = match (args.role, args.upstream) {
        (Role::Echo, _) => Server::builder().add_service(ToolServiceServer::new(EchoServer)),
        (Role::Proxy, Some(url)) => {
            let upstream = connect(&url).await?;
            Server::builder().add_service(ToolServiceServer::new(ProxyServer { upstream }))
        }
        (Role::Proxy, None) => {
            return Err(Error::Usage("--role proxy needs --upstream URL".to_owned()));
        }
    };
    // The parent reads this line to learn where to connect.
    println!("{addr}");
    let stop = stop_requested()?;
    router
        .serve_with_incoming_shutdown(incoming, stop)
        .await
        .map_err(|e| failed(format!("baseline server: {}", error_chain(&e))))?;
    Ok(0)
}

/// Completes on SIGTERM, SIGINT, or end of stdin (the parent is gone).
fn stop_requested() -> Result<impl Future<Output = ()>, Error> {
    let install = |kind| signal(kind).map_err(|e| Error::io("cannot install a signal handler", e));
    let mut term = install(SignalKind::terminate())?;
    let mut int = install(SignalKind::interrupt())?;
    Ok(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0_u8; 64];
        let stdin_closed = async {
            // Anything the parent writes is ignored; only EOF or an error matters.
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = stdin_closed => {}
        }
    })
}

/// One channel to `url` with the client settings the bench uses everywhere.
async fn connect(url: &str) -> Result<ToolServiceClient<Channel>, Error> {
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|_| Error::BadUrl {
            url: url.to_owned(),
        })?
        .connect_timeout(START_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Error::Unreachable {
            url: url.to_owned(),
            detail: error_chain(&e),
        })?;
    Ok(ToolServiceClient::new(channel))
}

/// A running baseline process (a child of this heistctl).
#[derive(Debug)]
pub struct BaselineProcess {
    role: Role,
    child: Child,
    /// Closing it tells the child to exit.
    stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl BaselineProcess {
    /// Starts `heistctl bench serve-baseline --role <role>` and waits for its address.
    pub async fn start(exe: &Path, role: Role, upstream: Option<&str>) -> Result<Self, Error> {
        let mut command = Command::new(exe);
        command
            .args(["bench", "serve-baseline", "--role", role.as_str()])
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(url) = upstream {
            command.args(["--upstream", url]);
        }
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {}", exe.display()), e))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("the baseline process has no stdout"))?;
        let mut line = String::new();
        // Kept open for the child's lifetime: a closed pipe would fail its next write.
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        match tokio::time::timeout(START_TIMEOUT, read).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => {
                return Err(failed(format!(
                    "the {} baseline exited before it listened",
                    role.as_str()
                )));
            }
            Ok(Err(e)) => return Err(Error::io("cannot read the baseline's address", e)),
            Err(_) => {
                return Err(failed(format!(
                    "the {} baseline did not listen within {} s",
                    role.as_str(),
                    START_TIMEOUT.as_secs()
                )));
            }
        }
        let addr: SocketAddr = line.trim().parse().map_err(|_| {
            failed(format!(
                "the baseline printed {line:?} instead of its address"
            ))
        })?;
        Ok(Self {
            role,
            child,
            stdin,
            _stdout: stdout,
            url: format!("http://{addr}"),
        })
    }

    /// Its resident memory, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.child.id().and_then(machine::rss_kib)
    }

    /// Closes its stdin and waits for it to exit (SIGKILL after a grace period).
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                role = self.role.as_str(),
                "baseline did not stop in time; killing it"
            );
            if let Err(err) = self.child.kill().await {
                tracing::debug!(%err, "SIGKILL failed");
            }
        }
    }
}
