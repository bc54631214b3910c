//! `coordinator healthcheck` / `worker healthcheck`: asks the process's own `/readyz` (or
//! `/healthz`) over HTTP/1.1 (over TLS when the process serves TLS), so a container
//! `HEALTHCHECK` needs no curl or nc in the image.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

/// `GET path` (`/readyz` or `/healthz`) on the process listening at `listen` (an unspecified
/// bind address is asked on loopback). `Ok` when it answers 200; otherwise why not, for the
/// health log.
/// With `tls`, the process serves TLS: the check trusts only its own certificate and presents
/// it (see [`crate::tls::Tls::self_client_config`]).
pub fn check(
    listen: SocketAddr,
    path: &str,
    timeout: Duration,
    tls: Option<&crate::tls::Tls>,
) -> Result<(), String> {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let reply = match tls {
        None => ask(stream, addr, path)?,
        Some(tls) => {
            let config = tls.self_client_config().map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::from(ip);
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| format!("cannot start TLS to {addr}: {e}"))?;
            ask(rustls::StreamOwned::new(conn, stream), addr, path)?
        }
    };
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Err(format!("{addr}{path} answered {status:?}: {body}"))
    }
}

/// Sends `GET path` on `stream` and reads the start of the answer.
fn ask(mut stream: impl Read + Write, addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot ask {addr}{path}: {e}"))?;
    let mut reply = Vec::new();
    // The status line and a short body are all we need; cap what we read. A TLS peer that
    // closes without close_notify still sent the answer: keep what arrived.
    if let Err(e) = stream.take(4096).read_to_end(&mut reply)
        && reply.is_empty()
    {
        return Err(format!("no answer from {addr}{path}: {e}"));
    }
    Ok(reply)
}
