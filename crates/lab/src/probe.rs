//! Probes with real packets: planned with the simulator's own resolution (same input errors),
//! checked for what the lab can run, and executed in parallel, each from its source's
//! namespace.
//!
//! Verdicts: `allow` when the destination answers (TCP handshake and echo; the HTTP response;
//! the UDP echo; the ICMP echo reply); `l7-deny` when an HTTP request is answered `403`;
//! `drop` otherwise, with the reason (no answer within the timeout, refused, unreachable).

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use palisade_policy::eval::Party;
use palisade_policy::model::proto;
use palisade_policy::simulate::{self, PlannedProbe, ProbeResult};
use palisade_policy::Engine;
use palisade_policy_api::load::{Diagnostic, Manifest};
use palisade_policy_api::scenario::{ConnectivityTest, Expectation, HttpProbe, Probe};

use crate::lab::Lab;
use crate::netns;
use crate::spec::LabSpec;

/// What a probe sends.
#[derive(Debug, Clone)]
pub enum ProbeKind {
    /// A TCP connection: handshake and echo, or one HTTP/1.1 request.
    Tcp { port: u16, http: Option<HttpProbe> },
    /// A UDP datagram that must come back.
    Udp { port: u16 },
    /// An ICMP (ICMPv6 for an IPv6 target) echo request.
    IcmpEcho,
}

/// A probe the lab can run.
#[derive(Debug, Clone)]
pub struct LabProbe {
    pub src: Party,
    pub dst: Party,
    pub kind: ProbeKind,
    /// The probe as written, for the report.
    pub probe: Probe,
}

/// How probes run.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// How long a probe waits for an answer.
    pub timeout: Duration,
    /// How many probes run at once.
    pub parallelism: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_millis(1500),
            parallelism: 16,
        }
    }
}

const UNSUPPORTED_HINT: &str =
    "the lab runs TCP (optionally one HTTP request), UDP and ICMP echo probes; \
     `palisade simulate` judges every kind";

/// Why the lab cannot run a planned probe: (field, message).
fn unsupported(p: &PlannedProbe) -> Option<(&'static str, String)> {
    let probe = &p.probe;
    if probe.dns.is_some() {
        return Some((
            "dns",
            "DNS probes are not supported in the lab yet (no cluster DNS server or DNS proxy)"
                .to_owned(),
        ));
    }
    if probe.kafka.is_some() {
        return Some((
            "kafka",
            "Kafka probes are not supported in the lab yet (no Kafka server or proxy)".to_owned(),
        ));
    }
    if p.fqdn.is_some() {
        return Some((
            "toFQDN",
            "toFQDN probes are not supported in the lab yet (they need the cluster DNS)".to_owned(),
        ));
    }
    if p.proto == proto::ICMP || p.proto == proto::ICMPV6 {
        let echo = if p.proto == proto::ICMP { 8 } else { 128 };
        let code = probe.icmp.as_ref().and_then(|i| i.code).unwrap_or(0);
        if p.port != echo || code != 0 {
            return Some((
                "icmp",
                format!(
                    "the lab sends ICMP echo requests only (type {echo}, code 0), not type {} code {code}",
                    p.port
                ),
            ));
        }
    }
    if probe.http.is_some() && p.proto != proto::TCP {
        return Some(("http", "an HTTP request needs protocol TCP".to_owned()));
    }
    None
}

/// Plans every probe of `tests` for the lab `spec` describes: the simulator's resolution
/// (named ports, parties; the same input errors as `simulate`), then what the lab can run.
/// Errors are located.
pub fn plan(
    engine: &Engine,
    tests: &[(&Manifest, &ConnectivityTest)],
    spec: &LabSpec,
) -> Result<Vec<LabProbe>, Vec<Diagnostic>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (m, t) in tests {
        let planned = match simulate::plan(engine, m, t) {
            Ok(p) => p,
            Err(e) => {
                errors.extend(e);
                continue;
            }
        };
        for (i, p) in planned.into_iter().enumerate() {
            if let Some((field, message)) = unsupported(&p) {
                errors.push(m.diagnostic(
                    &format!("spec.probes[{i}].{field}"),
                    message,
                    Some(UNSUPPORTED_HINT.to_owned()),
                ));
                continue;
            }
            let Some(dst) = p.dst.clone() else {
                continue;
            };
            if let Party::Ip(ip) = &dst {
                if !spec.has_address(*ip) {
                    errors.push(m.diagnostic(
                        &format!("spec.probes[{i}].toIP"),
                        format!(
                            "nothing in the lab has address {ip}: it is no pod's, not the node's \
                             and no externalHosts entry's"
                        ),
                        Some(format!(
                            "declare it under spec.externalHosts (name, ip: {ip}, ports) so the \
                             lab puts a host there"
                        )),
                    ));
                    continue;
                }
            }
            let kind = match p.proto {
                proto::TCP => ProbeKind::Tcp {
                    port: p.port,
                    http: p.probe.http.clone(),
                },
                proto::UDP => ProbeKind::Udp { port: p.port },
                _ => ProbeKind::IcmpEcho,
            };
            out.push(LabProbe {
                src: p.src.clone(),
                dst,
                kind,
                probe: p.probe,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Runs probes in parallel (at most `options.parallelism` at once); the results are in probe
/// order, as the report wants them.
pub fn run(lab: &Lab, probes: &[LabProbe], options: &ProbeOptions) -> Vec<ProbeResult> {
    let verdicts = verdicts(lab, probes, options);
    probes
        .iter()
        .zip(verdicts)
        .map(|(p, (verdict, reason))| simulate::result(&p.probe, verdict, reason))
        .collect()
}

/// The verdict and reason of every probe, in probe order.
pub fn verdicts(
    lab: &Lab,
    probes: &[LabProbe],
    options: &ProbeOptions,
) -> Vec<(Expectation, String)> {
    let slots: Mutex<Vec<Option<(Expectation, String)>>> = Mutex::new(vec![None; probes.len()]);
    let next = AtomicUsize::new(0);
    let workers = options.parallelism.clamp(1, probes.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(p) = probes.get(i) else { break };
                let r = execute(lab, p, options.timeout);
                slots.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .map(|r| r.unwrap_or((Expectation::Drop, "lab: the probe did not run".to_owned())))
        .collect()
}

/// Runs one probe on the calling thread, which enters the source's namespace for good: call
/// it only on a thread of its own.
fn execute(lab: &Lab, p: &LabProbe, timeout: Duration) -> (Expectation, String) {
    let Some(ns) = lab.netns_of(&p.src) else {
        return (
            Expectation::Drop,
            format!("lab: {} has no place in the lab", p.src),
        );
    };
    let src_v6 = lab.ip_of(&p.src, None).map(|ip| ip.is_ipv6());
    let Some(dst) = lab.ip_of(&p.dst, src_v6) else {
        return (
            Expectation::Drop,
            format!("lab: {} has no address in the lab", p.dst),
        );
    };
    if let Err(e) = netns::enter(ns) {
        return (Expectation::Drop, format!("lab: {e}"));
    }
    match &p.kind {
        ProbeKind::Tcp { port, http } => tcp(SocketAddr::new(dst, *port), http.as_ref(), timeout),
        ProbeKind::Udp { port } => udp(SocketAddr::new(dst, *port), timeout),
        ProbeKind::IcmpEcho => icmp_echo(dst, timeout),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

static TOKEN: AtomicU16 = AtomicU16::new(1);

fn token() -> u16 {
    TOKEN.fetch_add(1, Ordering::SeqCst)
}

fn failure(e: &std::io::Error, what: &str, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            format!("no answer from {what} within {}", secs(timeout))
        }
        ErrorKind::ConnectionRefused => {
            format!("{what} refused: nothing listens there (is the port declared?)")
        }
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            format!("{what} is unreachable: {e}")
        }
        _ => format!("{what}: {e}"),
    }
}

fn tcp(dst: SocketAddr, http: Option<&HttpProbe>, timeout: Duration) -> (Expectation, String) {
    let what = format!("{dst}/TCP");
    let started = Instant::now();
    let mut s = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) => return (Expectation::Drop, failure(&e, &what, timeout)),
    };
    let handshake = started.elapsed();
    if let Err(e) = s
        .set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
    {
        return (Expectation::Drop, format!("lab: {e}"));
    }
    let _ = s.set_nodelay(true);
    match http {
        None => tcp_echo(&mut s, &what, handshake, timeout),
        Some(h) => http_request(&mut s, dst, h, timeout),
    }
}

/// Reads until `done` or EOF, within `timeout` overall.
fn read_until(
    s: &mut TcpStream,
    timeout: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, Option<std::io::Error>) {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !done(&buf) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (buf, Some(ErrorKind::TimedOut.into()));
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (buf, Some(e)),
        }
    }
    (buf, None)
}

fn tcp_echo(
    s: &mut TcpStream,
    what: &str,
    handshake: Duration,
    timeout: Duration,
) -> (Expectation, String) {
    let line = format!("palisade-lab probe {}\n", token());
    let started = Instant::now();
    if let Err(e) = s.write_all(line.as_bytes()) {
        return (
            Expectation::Drop,
            format!("handshake with {what} completed, then sending failed: {e}"),
        );
    }
    let (got, err) = read_until(s, timeout, |b| b.len() >= line.len());
    if got.starts_with(line.as_bytes()) {
        (
            Expectation::Allow,
            format!(
                "answered: TCP handshake with {what} in {}, echo in {}",
                ms(handshake),
                ms(started.elapsed())
            ),
        )
    } else {
        let why = err.map_or_else(|| "the connection was closed".to_owned(), |e| e.to_string());
        (
            Expectation::Drop,
            format!("handshake with {what} completed but the echo did not come back: {why}"),
        )
    }
}

/// Header names and values must not smuggle line breaks into the request.
fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

fn http_request(
    s: &mut TcpStream,
    dst: SocketAddr,
    h: &HttpProbe,
    timeout: Duration,
) -> (Expectation, String) {
    let method = clean(h.method.as_deref().unwrap_or("GET"));
    let path = clean(h.path.as_deref().unwrap_or("/"));
    let host = h.host.as_deref().map_or_else(|| dst.to_string(), clean);
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: palisade-lab\r\n");
    for (k, v) in &h.headers {
        let _ = write!(request, "{}: {}\r\n", clean(k), clean(v));
    }
    request.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    let started = Instant::now();
    if let Err(e) = s.write_all(request.as_bytes()) {
        return (
            Expectation::Drop,
            format!("handshake with {dst}/TCP completed, then sending the request failed: {e}"),
        );
    }
    let (got, err) = read_until(s, timeout, |b| b.windows(2).any(|w| w == b"\r\n"));
    let text = String::from_utf8_lossy(&got);
    let status_line = text.lines().next().unwrap_or("").trim();
    let code = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(403) => (
            Expectation::L7Deny,
            format!("{method} {path} refused by {dst}: {status_line}"),
        ),
        Some(_) => (
            Expectation::Allow,
            format!(
                "answered: {method} {path} to {dst} got {status_line} in {}",
                ms(started.elapsed())
            ),
        ),
        None => {
            let why = err.map_or_else(|| "the connection was closed".to_owned(), |e| e.to_string());
            (
                Expectation::Drop,
                format!("handshake with {dst}/TCP completed but no HTTP response came: {why}"),
            )
        }
    }
}

fn unspecified(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

/// Sends `payload` every 300 ms until `matches(reply)` or the timeout.
fn datagram_exchange(
    sock: &UdpSocket,
    payload: &[u8],
    what: &str,
    timeout: Duration,
    matches: impl Fn(&[u8]) -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut buf = [0u8; 2048];
    let mut next_send = started;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("no answer from {what} within {}", secs(timeout)));
        }
        if now >= next_send {
            if let Err(e) = sock.send(payload) {
                return Err(failure(&e, what, timeout));
            }
            next_send = now + Duration::from_millis(300);
        }
        let wait = next_send
            .min(deadline)
            .saturating_duration_since(Instant::now());
        let _ = sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match sock.recv(&mut buf) {
            Ok(n) if matches(&buf[..n]) => return Ok(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return Err(format!("{what}: port unreachable (nothing listens there)"));
            }
            Err(e) => return Err(failure(&e, what, timeout)),
        }
    }
}

fn udp(dst: SocketAddr, timeout: Duration) -> (Expectation, String) {
    let what = format!("{dst}/UDP");
    let sock = match UdpSocket::bind(unspecified(dst.is_ipv6())).and_then(|s| {
        s.connect(dst)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => return (Expectation::Drop, failure(&e, &what, timeout)),
    };
    let payload = format!("palisade-lab probe {}\n", token());
    match datagram_exchange(&sock, payload.as_bytes(), &what, timeout, |r| {
        r == payload.as_bytes()
    }) {
        Ok(t) => (
            Expectation::Allow,
            format!("answered: UDP echo from {what} in {}", ms(t)),
        ),
        Err(why) => (Expectation::Drop, why),
    }
}

fn icmp_echo(dst: IpAddr, timeout: Duration) -> (Expectation, String) {
    let (domain, protocol, request, reply, name) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8, "ICMP"),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8, "ICMPv6"),
    };
    let what = format!("{dst} ({name} echo)");
    // A ping socket: the kernel sets the identifier and checksum (ping_group_range allows it).
    let sock = match Socket::new(domain, Type::DGRAM, Some(protocol)).and_then(|s| {
        s.connect(&SockAddr::from(SocketAddr::new(dst, 0)))
            .map(|()| s)
    }) {
        Ok(s) => UdpSocket::from(s),
        Err(e) => return (Expectation::Drop, format!("lab: ping socket: {e}")),
    };
    let seq = token().to_be_bytes();
    let mut packet = vec![request, 0, 0, 0, 0, 0, seq[0], seq[1]];
    packet.extend_from_slice(b"palisade-lab");
    match datagram_exchange(&sock, &packet, &what, timeout, |r| {
        r.len() >= packet.len() && r[0] == reply && r[6..8] == seq && r[8..] == packet[8..]
    }) {
        Ok(t) => (
            Expectation::Allow,
            format!("answered: {name} echo reply from {dst} in {}", ms(t)),
        ),
        Err(why) => (Expectation::Drop, why),
    }
}
