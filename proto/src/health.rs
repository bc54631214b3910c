//! `coordinator healthcheck` / `worker healthcheck`: asks the process's own `/readyz` (or
//! `/healthz`) over plain
//! HTTP/1.1, so a container `HEALTHCHECK` needs no curl or nc in the image.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

/// `GET path` (`/readyz` or `/healthz`) on the process listening at `listen` (an unspecified
/// bind address is asked on loopback). `Ok` when it answers 200; otherwise why not, for the
/// health log.
pub fn check(listen: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot ask {addr}{path}: {e}"))?;
    let mut reply = Vec::new();
    // The status line and a short body are all we need; cap what we read.
    stream
        .take(4096)
        .read_to_end(&mut reply)
        .map_err(|e| format!("no answer from {addr}{path}: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Err(format!("{addr}{path} answered {status:?}: {body}"))
    }
}
