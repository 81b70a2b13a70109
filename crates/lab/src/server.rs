//! Built-in servers: on every declared port of a namespace, a TCP server that echoes (and
//! answers an HTTP/1.1 request with `200 OK`) and a UDP echo server.
//!
//! One thread per namespace polls its listening sockets; each TCP connection gets a thread of
//! its own. Every thread checks the stop flag at least every 200 ms, so stopping is prompt and
//! every socket is closed when [`ServerSet::stop`] returns.

use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::netns;
use crate::spec::{ServerPort, Transport};
use crate::LabError;

/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(200);
/// How long a connection may stay silent before the server closes it.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// How long the server waits for a first line before treating the bytes as echo.
const FIRST_LINE_WAIT: Duration = Duration::from_secs(1);
/// Bounds on what an HTTP request may carry.
const MAX_HEADER: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

enum Listener {
    Tcp(TcpListener, u16),
    Udp(UdpSocket),
}

impl Listener {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l, _) => l.as_fd(),
            Listener::Udp(u) => u.as_fd(),
        }
    }
}

/// The servers of one lab.
#[derive(Default)]
pub(crate) struct ServerSet {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ServerSet {
    /// Starts servers on `ports` inside `netns`; returns once every socket is bound.
    /// `ipv6`: bind the dual-stack wildcard `[::]` instead of `0.0.0.0`.
    pub(crate) fn start(
        &mut self,
        netns: &str,
        label: &str,
        ipv6: bool,
        ports: &[ServerPort],
    ) -> Result<(), LabError> {
        if ports.is_empty() {
            return Ok(());
        }
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let stop = Arc::clone(&self.stop);
        let ns = netns.to_owned();
        let label: Arc<str> = Arc::from(label);
        let ports = ports.to_vec();
        let handle = std::thread::Builder::new()
            .name(format!("srv {label}"))
            .spawn(move || {
                let bound = netns::enter(&ns)
                    .map_err(|e| e.to_string())
                    .and_then(|()| bind_all(ipv6, &ports));
                match bound {
                    Ok(listeners) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(&listeners, &label, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| LabError::io("spawning a server thread", e))?;
        self.threads.push(handle);
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(LabError::Server {
                netns: netns.to_owned(),
                message,
            }),
            Err(_) => Err(LabError::Server {
                netns: netns.to_owned(),
                message: "the server thread ended before binding".to_owned(),
            }),
        }
    }

    /// Stops every server and waits for their threads (and sockets) to be gone.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for ServerSet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_all(ipv6: bool, ports: &[ServerPort]) -> Result<Vec<Listener>, String> {
    let any = if ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let mut out = Vec::new();
    for p in ports {
        let addr = SocketAddr::new(any, p.port);
        let what = format!("{}/{}", p.port, p.transport.as_str());
        match p.transport {
            Transport::Tcp => {
                let l = TcpListener::bind(addr).map_err(|e| format!("bind {what}: {e}"))?;
                l.set_nonblocking(true)
                    .map_err(|e| format!("bind {what}: {e}"))?;
                out.push(Listener::Tcp(l, p.port));
            }
            Transport::Udp => {
                let u = UdpSocket::bind(addr).map_err(|e| format!("bind {what}: {e}"))?;
                u.set_nonblocking(true)
                    .map_err(|e| format!("bind {what}: {e}"))?;
                out.push(Listener::Udp(u));
            }
        }
    }
    Ok(out)
}

fn serve(listeners: &[Listener], label: &Arc<str>, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd<'_>> = listeners
                .iter()
                .map(|l| PollFd::new(l.fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => break,
            }
            fds.iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect()
        };
        for i in ready {
            match &listeners[i] {
                Listener::Tcp(l, port) => loop {
                    match l.accept() {
                        Ok((stream, _)) => {
                            let label = Arc::clone(label);
                            let stop = Arc::clone(stop);
                            let port = *port;
                            if let Ok(h) = std::thread::Builder::new()
                                .name(format!("conn {label}:{port}"))
                                .spawn(move || serve_tcp(stream, &label, &stop))
                            {
                                conns.push(h);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                },
                Listener::Udp(u) => loop {
                    match u.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let _ = u.send_to(&buf[..n], from);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                },
            }
        }
        conns.retain(|h| !h.is_finished());
    }
    for h in conns {
        let _ = h.join();
    }
}

/// A parsed HTTP request line.
struct RequestLine {
    method: String,
    path: String,
}

fn parse_request_line(buf: &[u8]) -> Option<RequestLine> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&buf[..end])
        .ok()?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let path = parts.next()?;
    let version = parts.next()?;
    let token = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    (token && !path.is_empty() && version.starts_with("HTTP/1.") && parts.next().is_none()).then(
        || RequestLine {
            method: method.to_owned(),
            path: path.to_owned(),
        },
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads into `buf` until `done(buf)` or the deadline; false on EOF, error, stop or timeout.
fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    stop: &AtomicBool,
    done: impl Fn(&[u8]) -> bool,
) -> bool {
    let mut chunk = [0u8; 16384];
    while !done(buf) {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return false;
        }
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn serve_tcp(mut s: TcpStream, label: &str, stop: &AtomicBool) {
    if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(TICK)).is_err() {
        return;
    }
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    // The first line decides: an HTTP/1.x request line gets an HTTP answer, anything else an
    // echo. Bytes without a newline for a second are echo too.
    let start = Instant::now();
    let mut first_byte: Option<Instant> = None;
    let mut chunk = [0u8; 16384];
    loop {
        if buf.contains(&b'\n') || buf.len() >= MAX_HEADER {
            break;
        }
        if first_byte.is_some_and(|t| t.elapsed() >= FIRST_LINE_WAIT) {
            break;
        }
        if stop.load(Ordering::SeqCst) || start.elapsed() >= IDLE_LIMIT {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                let _ = s.write_all(&buf);
                return;
            }
            Ok(n) => {
                first_byte.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
    match parse_request_line(&buf) {
        Some(req) => serve_http(s, buf, &req, label, stop),
        None => serve_echo(s, &buf, stop),
    }
}

fn serve_echo(mut s: TcpStream, first: &[u8], stop: &AtomicBool) {
    if !first.is_empty() && s.write_all(first).is_err() {
        return;
    }
    let mut chunk = [0u8; 16384];
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) && last.elapsed() < IDLE_LIMIT {
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
                last = Instant::now();
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn serve_http(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    req: &RequestLine,
    label: &str,
    stop: &AtomicBool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let head_end = |b: &[u8]| {
        find(b, b"\r\n\r\n")
            .map(|i| i + 4)
            .or_else(|| find(b, b"\n\n").map(|i| i + 2))
    };
    if !read_until(&mut s, &mut buf, deadline, stop, |b| {
        head_end(b).is_some() || b.len() >= MAX_HEADER
    }) {
        return;
    }
    let Some(end) = head_end(&buf) else { return };
    // Read the body the request declares, so closing does not reset the connection.
    let body = content_length(&buf[..end]).min(MAX_BODY);
    if !read_until(&mut s, &mut buf, deadline, stop, |b| b.len() >= end + body) {
        return;
    }
    let text = format!("palisade-lab {label}: {} {}\n", req.method, req.path);
    let body_text = if req.method == "HEAD" {
        ""
    } else {
        text.as_str()
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\nServer: palisade-lab\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body_text}",
        text.len()
    );
    if s.write_all(response.as_bytes()).is_err() {
        return;
    }
    let _ = s.shutdown(Shutdown::Write);
    // Drain until the client closes (briefly), for a clean FIN instead of a reset.
    let mut sink = Vec::new();
    let _ = read_until(
        &mut s,
        &mut sink,
        Instant::now() + Duration::from_millis(500),
        stop,
        |_| false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert!(parse_request_line(b"GET / HTTP/1.1\r\n").is_some());
        let r = parse_request_line(b"POST /v1/request-landing HTTP/1.0\n").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/request-landing")
        );
        assert!(parse_request_line(b"hello world\n").is_none());
        assert!(parse_request_line(b"get / HTTP/1.1\n").is_none());
        assert!(parse_request_line(b"GET / HTTP/1.1").is_none());
        assert!(parse_request_line(b"GET / SPDY/3\n").is_none());
    }

    #[test]
    fn content_lengths() {
        assert_eq!(
            content_length(b"POST / HTTP/1.1\r\ncontent-length: 12\r\n\r\n"),
            12
        );
        assert_eq!(content_length(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    }
}
