//! `coordinator healthcheck` / `worker healthcheck`: asks the process's own `/readyz` over plain
//! HTTP/1.1, so a container `HEALTHCHECK` needs no curl or nc in the image.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

/// `GET /readyz` on the process listening at `listen` (an unspecified bind address is asked on
/// loopback). `Ok` when it answers 200; otherwise why not, for the health log.
pub fn check_ready(listen: SocketAddr, timeout: Duration) -> Result<(), String> {
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
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot ask {addr}/readyz: {e}"))?;
    let mut reply = Vec::new();
    // The status line and a short body are all we need; cap what we read.
    stream
        .take(4096)
        .read_to_end(&mut reply)
        .map_err(|e| format!("no answer from {addr}/readyz: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Err(format!("{addr}/readyz answered {status:?}: {body}"))
    }
}
