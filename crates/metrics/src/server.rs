//! `GET /metrics` over HTTP/1.1 on a std `TcpListener`, one thread, one request per
//! connection.
//!
//! Requests are bounded ([`MAX_REQUEST_BYTES`] of head, a read timeout), so a slow or hostile
//! client costs at most [`IO_TIMEOUT`] of the single thread.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::Metrics;

/// Longest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8192;

/// Content type of the exposition (OpenMetrics text, which Prometheus negotiates).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Read and write timeout of one connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The running endpoint; stops when shut down or dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds an address as Cilium's `--prometheus-serve-addr` takes it: `host:port`, `[v6]:port`,
/// or `:port` for every address (IPv6 and IPv4 if the host has IPv6, else IPv4).
pub fn bind_addr(spec: &str) -> io::Result<TcpListener> {
    if let Some(port) = spec.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid port in {spec:?}"),
            )
        })?;
        return TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)));
    }
    TcpListener::bind(spec)
}

/// Serves `/metrics` from `metrics` on `listener` in a new thread.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("metrics-http".to_owned())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        // A client that goes away mid-request is its own problem.
                        let _ = handle(conn, &metrics);
                    }
                }
            })?
    };
    Ok(MetricsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the thread.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, IO_TIMEOUT).is_ok() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Reads a request head: up to the blank line, at most [`MAX_REQUEST_BYTES`]. `None` if it is
/// too long.
fn read_head(conn: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-request",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    content_type: &str,
    extra: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(header.as_bytes())?;
    if !head_only {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

fn handle(mut conn: TcpStream, metrics: &Metrics) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let text = "text/plain; charset=utf-8";
    let Some(head) = read_head(&mut conn)? else {
        return respond(
            &mut conn,
            "431 Request Header Fields Too Large",
            text,
            "",
            "request too large\n",
            false,
        );
    };
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return respond(
            &mut conn,
            "400 Bad Request",
            text,
            "",
            "bad request\n",
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return respond(
            &mut conn,
            "505 HTTP Version Not Supported",
            text,
            "",
            "HTTP/1.x only\n",
            false,
        );
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            text,
            "Allow: GET, HEAD\r\n",
            "method not allowed\n",
            false,
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if path != "/metrics" {
        return respond(
            &mut conn,
            "404 Not Found",
            text,
            "",
            "not found\n",
            head_only,
        );
    }
    respond(
        &mut conn,
        "200 OK",
        CONTENT_TYPE,
        "",
        &metrics.encode(),
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn scrape_metrics_over_http() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_policy_revision(7);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = serve(listener, metrics.clone()).unwrap();
        let addr = server.local_addr();

        let resp = request(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        );
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.contains("palisade_policy_revision 7\n"), "{body}");
        assert!(body.contains("# TYPE palisade_drops counter"), "{body}");
        assert!(body.ends_with("# EOF\n"));

        // The numbers are live.
        metrics.set_policy_revision(8);
        let resp = request(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(resp.contains("palisade_policy_revision 8\n"), "{resp}");

        let resp = request(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 200 OK"));
        assert!(resp.ends_with("\r\n\r\n"), "HEAD has no body: {resp}");

        let resp = request(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 404 Not Found"), "{resp}");
        let resp = request(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            resp.starts_with("HTTP/1.1 405 Method Not Allowed"),
            "{resp}"
        );
        assert!(resp.contains("Allow: GET, HEAD"));
        let resp = request(addr, b"GARBAGE\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request"), "{resp}");
        let resp = request(addr, b"GET /metrics SPDY/3\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 505"), "{resp}");

        // An endless header is cut off.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..1000 {
            big.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaa\r\n").as_bytes());
        }
        big.extend_from_slice(b"\r\n");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may stop reading (and close) before everything is written.
        let _ = s.write_all(&big);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");

        // Still serving after all that, then stops.
        let resp = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 200 OK"));
        server.shutdown();
        assert!(TcpStream::connect(addr).is_err(), "closed after shutdown");
    }

    #[test]
    fn bind_specs() {
        let l = bind_addr("127.0.0.1:0").unwrap();
        assert!(l.local_addr().unwrap().ip().is_loopback());
        let l = bind_addr(":0").unwrap();
        assert!(l.local_addr().unwrap().ip().is_unspecified());
        let server = serve(l, Arc::new(Metrics::new())).unwrap();
        drop(server); // stops through Drop, waking accept through loopback
        assert!(bind_addr(":http").is_err());
    }
}
