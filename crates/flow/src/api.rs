//! The observe protocol between `palisade observe` and the agent, on the agent's unix socket.
//!
//! The framing is the agent API's: each message is one JSON document preceded by its length
//! (4 bytes, big endian), at most [`MAX_MESSAGE_BYTES`]. The client sends one
//! [`ObserveRequest`], `{"request": "flows", "filter": {...}, "since": ..., "last": N,
//! "follow": bool}` — the agent's own `#[serde(tag = "request", rename_all = "camelCase")]`
//! request enum gets exactly that shape from a `Flows(palisade_flow::FlowsRequest)` variant.
//! The agent answers with a stream of [`FlowsResponse`] messages (tagged `"response"`):
//! `flow` for each flow (oldest first), `lost` when a follower fell behind the ring, `stats`
//! as a heartbeat every few seconds while following, and `end` (the ring's counters) last; or
//! a single `error` (`{"response": "error", "message": "..."}`, as the agent's other errors).
//! A following client ends the stream by closing the connection; after `end` the connection
//! may carry further requests.
//!
//! [`serve_flows`] is the agent's side (called by its connection thread with the parsed
//! request; it needs only the shared [`FlowRing`]), [`handle_connection`] a whole connection
//! of a socket dedicated to flows; [`stream_flows`] and [`fetch_flows`] are the client's.

use std::io::{self, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::filter::Filter;
use crate::flow::Flow;
use crate::ring::{FlowRing, RingStats};

/// Where `palisade observe` looks for the agent unless told otherwise (the agent's default).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/palisade/agent.sock";

/// Largest message either side accepts (the agent API's limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How often a following stream sends `stats` when no flow came.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long a client waits for the next message before giving up (several heartbeats).
pub const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What `palisade observe` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowsRequest {
    pub filter: Filter,
    /// Only flows at or after this time.
    #[serde(
        with = "crate::time::rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub since: Option<SystemTime>,
    /// Only flows before this time (a following stream ends once it has passed).
    #[serde(
        with = "crate::time::rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub until: Option<SystemTime>,
    /// Only the last N of the matching flows in the buffer (with `follow`: then the new ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Keep the stream open and send new matching flows as they come.
    pub follow: bool,
}

impl FlowsRequest {
    /// The filter and the time bounds (not `last`, which is about the whole answer).
    pub fn matches(&self, flow: &Flow) -> bool {
        self.since.is_none_or(|t| flow.time >= t)
            && self.until.is_none_or(|t| flow.time < t)
            && self.filter.matches(flow)
    }
}

/// The request message: `{"request": "flows", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "camelCase")]
pub enum ObserveRequest {
    Flows(FlowsRequest),
}

/// One message of the agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "camelCase")]
pub enum FlowsResponse {
    Flow(Arc<Flow>),
    /// Flows this follower missed: the ring overwrote them before they were sent.
    Lost {
        count: u64,
    },
    /// Heartbeat while following: the ring's counters.
    Stats(RingStats),
    /// The last message: the ring's counters.
    End(RingStats),
    /// The request failed; nothing follows.
    Error {
        message: String,
    },
}

/// Writes one message: its length (4 bytes, big endian), then its JSON.
pub fn write_message<T: Serialize, W: Write>(w: &mut W, message: &T) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes is over the limit", body.len()),
        ));
    }
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)
}

/// Reads one message; `None` if the peer closed the connection before a new one started.
pub fn read_message<T: DeserializeOwned, R: Read>(r: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Answers one parsed request from the ring: the matching flows, then (with `follow`) new ones
/// as they come until `stop` is set, the ring closes, `until` passes or the client goes away
/// (a write fails: that error is returned). Ends with an `end` message, after which the
/// connection may carry another request.
pub fn serve_flows<W: Write>(
    ring: &FlowRing,
    request: &FlowsRequest,
    out: W,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut out = BufWriter::new(out);
    let (flows, mut cursor) = ring.snapshot(request);
    for f in flows {
        write_message(&mut out, &FlowsResponse::Flow(f))?;
    }
    if !request.follow {
        write_message(&mut out, &FlowsResponse::End(ring.stats()))?;
        return out.flush();
    }
    out.flush()?;
    let mut last_write = Instant::now();
    loop {
        let past_until = request.until.is_some_and(|t| SystemTime::now() >= t);
        if stop.load(Ordering::Relaxed) || past_until {
            break;
        }
        let batch = ring.wait(&mut cursor, Duration::from_millis(500));
        let mut wrote = false;
        if batch.missed > 0 {
            write_message(
                &mut out,
                &FlowsResponse::Lost {
                    count: batch.missed,
                },
            )?;
            wrote = true;
        }
        for f in batch.flows {
            if request.matches(&f) {
                write_message(&mut out, &FlowsResponse::Flow(f))?;
                wrote = true;
            }
        }
        if batch.closed {
            break;
        }
        if !wrote && last_write.elapsed() >= HEARTBEAT {
            write_message(&mut out, &FlowsResponse::Stats(ring.stats()))?;
            wrote = true;
        }
        if wrote {
            out.flush()?;
            last_write = Instant::now();
        }
    }
    write_message(&mut out, &FlowsResponse::End(ring.stats()))?;
    out.flush()
}

/// Serves a whole connection of a socket dedicated to flows: requests one after another until
/// the peer closes; anything but a flows request is answered with `error` and ends it.
pub fn handle_connection(
    ring: &FlowRing,
    stream: &UnixStream,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = stream;
    loop {
        match read_message::<ObserveRequest, _>(&mut reader) {
            Ok(None) => return Ok(()),
            Ok(Some(ObserveRequest::Flows(req))) => serve_flows(ring, &req, stream, stop)?,
            Err(e) => {
                let mut w = stream;
                write_message(
                    &mut w,
                    &FlowsResponse::Error {
                        message: format!("bad request: {e}"),
                    },
                )?;
                return w.flush();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent socket at {0}: is `palisade agent` running? (another socket: --socket PATH; flows saved in a file: --from-file PATH)")]
    NoAgent(PathBuf),
    #[error("permission denied on {0}: the agent's API is root-only; run this command as root")]
    PermissionDenied(PathBuf),
    #[error("the agent at {0} is not running (stale socket: nobody accepts connections)")]
    NotRunning(PathBuf),
    #[error("agent socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent closed the connection before the end of the reply")]
    Closed,
    #[error("the agent refused the request: {0}")]
    Agent(String),
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::NoAgent(socket.to_owned()),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_owned()),
        io::ErrorKind::ConnectionRefused => ClientError::NotRunning(socket.to_owned()),
        _ => ClientError::Connect {
            path: socket.to_owned(),
            source: e,
        },
    })
}

/// Sends a request and hands every response message to `on` until `end` (handed on too), an
/// `error` (returned as [`ClientError::Agent`]), or `on` returns false (the connection is then
/// closed, which ends a following stream).
pub fn stream_flows(
    socket: &Path,
    request: &FlowsRequest,
    mut on: impl FnMut(FlowsResponse) -> bool,
) -> Result<(), ClientError> {
    let stream = connect(socket)?;
    stream.set_read_timeout(Some(CLIENT_READ_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_READ_TIMEOUT))?;
    let mut w = &stream;
    write_message(&mut w, &ObserveRequest::Flows(request.clone()))?;
    w.flush()?;
    let mut r = &stream;
    loop {
        let Some(msg) = read_message::<FlowsResponse, _>(&mut r)? else {
            return Err(ClientError::Closed);
        };
        match msg {
            FlowsResponse::Error { message } => return Err(ClientError::Agent(message)),
            FlowsResponse::End(_) => {
                on(msg);
                return Ok(());
            }
            other => {
                if !on(other) {
                    return Ok(());
                }
            }
        }
    }
}

/// The flows a (non-following) request selects; `request.follow` is ignored.
pub fn fetch_flows(socket: &Path, request: &FlowsRequest) -> Result<Vec<Flow>, ClientError> {
    let request = FlowsRequest {
        follow: false,
        ..request.clone()
    };
    let mut flows = Vec::new();
    stream_flows(socket, &request, |msg| {
        if let FlowsResponse::Flow(f) = msg {
            flows.push(Arc::unwrap_or_clone(f));
        }
        true
    })?;
    Ok(flows)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;
    use crate::filter::FilterFlags;
    use crate::flow::Verdict;
    use crate::testutil::flow;
    use crate::time::from_unix_nanos;

    fn numbered(i: u32) -> Flow {
        let mut f = flow();
        f.source.identity = i;
        f.time = from_unix_nanos(i128::from(i) * 1_000_000_000);
        if i % 2 == 1 {
            f.verdict = Verdict::Dropped;
        }
        f
    }

    /// A fake agent on a socket in a temporary directory, serving `ring`.
    fn agent(ring: Arc<FlowRing>, stop: Arc<AtomicBool>) -> (PathBuf, thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "palisade-flow-api-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ring = ring.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    let _ = handle_connection(&ring, &conn, &stop);
                });
            }
        });
        (path, t)
    }

    #[test]
    fn request_wire_shape() {
        let req = FlowsRequest {
            filter: FilterFlags {
                verdict: vec!["DROPPED".to_owned()],
                ..FilterFlags::default()
            }
            .build()
            .unwrap(),
            since: Some(from_unix_nanos(0)),
            until: None,
            last: Some(5),
            follow: true,
        };
        let msg = ObserveRequest::Flows(req.clone());
        let json = serde_json::to_string(&msg).unwrap();
        assert!(
            json.starts_with(r#"{"request":"flows","filter":{"verdicts":["DROPPED"]"#),
            "{json}"
        );
        assert!(
            json.contains(r#""since":"1970-01-01T00:00:00.000000000Z""#),
            "{json}"
        );
        assert!(json.contains(r#""last":5,"follow":true"#), "{json}");
        let back: ObserveRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, msg);
        let minimal: ObserveRequest = serde_json::from_str(r#"{"request":"flows"}"#).unwrap();
        assert_eq!(minimal, ObserveRequest::Flows(FlowsRequest::default()));

        let end = serde_json::to_string(&FlowsResponse::End(RingStats::default())).unwrap();
        assert!(
            end.starts_with(r#"{"response":"end","capacity":0"#),
            "{end}"
        );
        let lost = serde_json::to_string(&FlowsResponse::Lost { count: 3 }).unwrap();
        assert_eq!(lost, r#"{"response":"lost","count":3}"#);
        let err: FlowsResponse =
            serde_json::from_str(r#"{"response":"error","message":"no"}"#).unwrap();
        assert_eq!(
            err,
            FlowsResponse::Error {
                message: "no".to_owned()
            }
        );
        let f = FlowsResponse::Flow(Arc::new(numbered(3)));
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.starts_with(r#"{"response":"flow","time":"#), "{json}");
        assert_eq!(serde_json::from_str::<FlowsResponse>(&json).unwrap(), f);
    }

    #[test]
    fn framing() {
        let mut buf = Vec::new();
        write_message(&mut buf, &FlowsResponse::Lost { count: 1 }).unwrap();
        write_message(&mut buf, &FlowsResponse::Lost { count: 2 }).unwrap();
        assert_eq!(&buf[..4], &29u32.to_be_bytes());
        let mut r = io::Cursor::new(buf.clone());
        assert_eq!(
            read_message::<FlowsResponse, _>(&mut r).unwrap(),
            Some(FlowsResponse::Lost { count: 1 })
        );
        assert_eq!(
            read_message::<FlowsResponse, _>(&mut r).unwrap(),
            Some(FlowsResponse::Lost { count: 2 })
        );
        assert_eq!(read_message::<FlowsResponse, _>(&mut r).unwrap(), None);
        let mut truncated = io::Cursor::new(buf[..10].to_vec());
        assert!(read_message::<FlowsResponse, _>(&mut truncated).is_err());
        let mut huge = io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(read_message::<FlowsResponse, _>(&mut huge).is_err());
    }

    #[test]
    fn fetch_and_follow_through_a_socket() {
        let ring = Arc::new(FlowRing::new(100));
        ring.extend((0..6).map(numbered));
        let stop = Arc::new(AtomicBool::new(false));
        let (path, _t) = agent(ring.clone(), stop.clone());

        let req = FlowsRequest {
            filter: FilterFlags {
                verdict: vec!["DROPPED".to_owned()],
                ..FilterFlags::default()
            }
            .build()
            .unwrap(),
            last: Some(2),
            ..FlowsRequest::default()
        };
        let got = fetch_flows(&path, &req).unwrap();
        let ids: Vec<u32> = got.iter().map(|f| f.source.identity).collect();
        assert_eq!(ids, vec![3, 5]);

        // Follow: the snapshot, then new flows as they are pushed.
        let follow = FlowsRequest {
            follow: true,
            ..req
        };
        let pusher = {
            let ring = ring.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                ring.extend((6..10).map(numbered));
            })
        };
        let mut seen = Vec::new();
        stream_flows(&path, &follow, |msg| {
            if let FlowsResponse::Flow(f) = msg {
                seen.push(f.source.identity);
            }
            seen.len() < 4
        })
        .unwrap();
        pusher.join().unwrap();
        assert_eq!(seen, vec![3, 5, 7, 9]);

        // Closing the ring ends following streams with `end`.
        let closer = {
            let ring = ring.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                ring.close();
            })
        };
        let mut ended = false;
        stream_flows(&path, &follow, |msg| {
            ended |= matches!(msg, FlowsResponse::End(_));
            true
        })
        .unwrap();
        closer.join().unwrap();
        assert!(ended);

        // Another request on the same connection after `end`; then a bad one is refused.
        let mut s = UnixStream::connect(&path).unwrap();
        for _ in 0..2 {
            write_message(&mut s, &ObserveRequest::Flows(FlowsRequest::default())).unwrap();
            let mut n = 0;
            loop {
                match read_message::<FlowsResponse, _>(&mut s).unwrap().unwrap() {
                    FlowsResponse::Flow(_) => n += 1,
                    FlowsResponse::End(stats) => {
                        assert_eq!(stats.received, 10);
                        break;
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(n, 10);
        }
        write_message(&mut s, &serde_json::json!({"request": "apply"})).unwrap();
        match read_message::<FlowsResponse, _>(&mut s).unwrap().unwrap() {
            FlowsResponse::Error { message } => {
                assert!(message.starts_with("bad request"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let missing = path.with_file_name("nope.sock");
        let err = fetch_flows(&missing, &FlowsRequest::default()).unwrap_err();
        assert!(matches!(err, ClientError::NoAgent(_)), "{err}");
        assert!(err.to_string().contains("--from-file"), "{err}");
        stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&path);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
