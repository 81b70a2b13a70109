//! Serving the API: the socket (mode 0600, root's, in a 0700 directory the agent creates),
//! one thread per connection (bounded), one worker thread owning the [`Agent`] so requests
//! are handled one at a time, and a signal thread that stops the agent cleanly on
//! SIGTERM/SIGINT/SIGHUP. Stopping (or crashing) leaves the programs attached and the maps
//! pinned: enforcement continues without the agent.
//!
//! Between requests the worker reads the datapath's events and counters (see
//! [`crate::telemetry`]). Flow requests (`palisade observe`) never reach the worker: the
//! connection's thread answers them from the shared flow buffer, following it as long as the
//! client wants. With `--prometheus-serve-addr`, one more thread serves `/metrics`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{umask, Mode};
use palisade_flow::FlowRing;

use crate::daemon::{log, Agent, AgentError, Options};
use crate::protocol::{read_message, write_message, ProtocolError, Request, Response};
use crate::telemetry::{PollSchedule, Telemetry};

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may stay silent before the agent closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping agent lets following `observe` streams send their last message.
pub const FLOW_STREAMS_GRACE: Duration = Duration::from_secs(1);

/// Set when the agent stops: flow streams end.
static STOP: AtomicBool = AtomicBool::new(false);
/// Flow streams being served.
static FLOW_STREAMS: AtomicUsize = AtomicUsize::new(0);

enum Job {
    Request {
        request: Request,
        received: Instant,
        reply: mpsc::Sender<Response>,
    },
    Shutdown(Signal),
}

/// Creates the socket: its directory (0700) if missing, a stale socket replaced, an agent
/// already serving refused; the socket itself 0600 (owned by root: the agent runs as root).
pub fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let socket_err = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(socket_err)?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(AgentError::AlreadyRunning(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(socket_err)?;
        }
        Ok(_) => return Err(AgentError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
    Ok(listener)
}

/// Runs the agent until a signal stops it.
pub fn run(options: Options) -> Result<(), AgentError> {
    // Everything the agent creates (state files, socket, directories) is private.
    umask(Mode::from_bits_truncate(0o077));
    // Block the stop signals in every thread (threads inherit the mask); one thread waits
    // for them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| AgentError::Other(format!("blocking signals: {e}")))?;

    let mut options = options;
    let socket = options.socket.clone();
    log(&format!(
        "starting: node {}, state {}, pin directory {}, flow buffer {}, event rate limit {}",
        options.node_name,
        options.state_dir.display(),
        options.bpf_pin_dir.display(),
        options.flow_buffer,
        match options.events_rate_limit.rate {
            0 => "none".to_owned(),
            rate => format!(
                "{rate}/s per CPU (burst {})",
                options.events_rate_limit.burst
            ),
        }
    ));
    let telemetry = Telemetry::new(options.flow_buffer)
        .map_err(|e| AgentError::Other(format!("reading the clocks: {e}")))?;
    // Bound before anything else, so a taken port fails the start at once.
    let _metrics_server = match options.prometheus_serve_addr.as_deref() {
        Some(addr) => {
            let server = palisade_metrics::bind_addr(addr)
                .and_then(|l| palisade_metrics::serve(l, telemetry.metrics.clone()))
                .map_err(|e| AgentError::Other(format!("--prometheus-serve-addr {addr}: {e}")))?;
            let bound = server.local_addr().to_string();
            log(&format!("serving metrics on http://{bound}/metrics"));
            options.prometheus_serve_addr = Some(bound);
            Some(server)
        }
        None => None,
    };
    let ring = telemetry.ring.clone();
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), AgentError>>();
    let worker_socket = socket.clone();
    std::thread::Builder::new()
        .name("agent".to_owned())
        .spawn(move || {
            // The agent lives on this thread only.
            let mut agent = match Agent::start(options, telemetry) {
                Ok(a) => {
                    let _ = ready_tx.send(Ok(()));
                    a
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // Requests first; the datapath's events and counters between them, at least
            // every EVENT_POLL.
            let mut schedule = PollSchedule::now();
            loop {
                match queue.recv_timeout(schedule.wait()) {
                    Ok(Job::Request {
                        request,
                        received,
                        reply,
                    }) => {
                        let response = agent.handle(request, received);
                        let _ = reply.send(response);
                    }
                    Ok(Job::Shutdown(signal)) => {
                        let _ = fs::remove_file(&worker_socket);
                        log(&format!(
                            "{signal} received: stopping; the programs stay attached and the \
                             maps pinned, so policy is still enforced"
                        ));
                        agent.poll_datapath(&mut PollSchedule::now());
                        stop_flow_streams(&agent.telemetry().ring);
                        std::process::exit(0);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                agent.poll_datapath(&mut schedule);
            }
        })
        .map_err(|e| AgentError::Other(format!("starting the agent thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(AgentError::Other("the agent thread died".to_owned())),
    }
    let listener = bind(&socket)?;
    let signal_jobs = jobs.clone();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                let _ = signal_jobs.send(Job::Shutdown(signal));
            }
        })
        .map_err(|e| AgentError::Other(format!("starting the signal thread: {e}")))?;
    log(&format!("serving on {} (root only)", socket.display()));

    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log(&format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_message(
                &mut stream,
                &Response::Error {
                    message: format!("the agent is busy ({MAX_CONNECTIONS} connections)"),
                },
            );
            continue;
        }
        let jobs = jobs.clone();
        let counter = Arc::clone(&active);
        let ring = Arc::clone(&ring);
        let spawned = std::thread::Builder::new()
            .name("conn".to_owned())
            .spawn(move || {
                serve(stream, &jobs, &ring);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log(&format!("cannot start a connection thread: {e}"));
        }
    }
    Ok(())
}

/// Ends every flow stream (each sends its `end`) and waits a little for them to finish.
fn stop_flow_streams(ring: &FlowRing) {
    STOP.store(true, Ordering::SeqCst);
    ring.close();
    let deadline = Instant::now() + FLOW_STREAMS_GRACE;
    while FLOW_STREAMS.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Answers a flows request from the buffer (following it if asked); false when the
/// connection is done for.
fn serve_flows(
    stream: &UnixStream,
    ring: &FlowRing,
    request: &palisade_flow::FlowsRequest,
) -> bool {
    FLOW_STREAMS.fetch_add(1, Ordering::SeqCst);
    let served = palisade_flow::serve_flows(ring, request, stream, &STOP);
    FLOW_STREAMS.fetch_sub(1, Ordering::SeqCst);
    served.is_ok()
}

/// Serves one connection: root peers only, then request → response until the peer closes.
fn serve(mut stream: UnixStream, jobs: &mpsc::Sender<Job>, ring: &FlowRing) {
    match getsockopt(&stream, PeerCredentials) {
        Ok(cred) if cred.uid() == 0 => {}
        Ok(cred) => {
            log(&format!(
                "refused a client with uid {} (pid {}): the API is root-only",
                cred.uid(),
                cred.pid()
            ));
            let _ = write_message(
                &mut stream,
                &Response::Error {
                    message: format!(
                        "permission denied: the agent's API is root-only (you are uid {})",
                        cred.uid()
                    ),
                },
            );
            return;
        }
        Err(e) => {
            log(&format!("reading a client's credentials: {e}"));
            return;
        }
    }
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(IDLE_TIMEOUT)).is_err()
    {
        return;
    }
    loop {
        let request: Request = match read_message(&mut stream) {
            Ok(r) => r,
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => return,
            Err(e) => {
                let _ = write_message(
                    &mut stream,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                );
                return;
            }
        };
        if let Request::Flows(flows) = &request {
            if serve_flows(&stream, ring, flows) {
                continue;
            }
            return;
        }
        let received = Instant::now();
        let (reply, answer) = mpsc::channel();
        let sent = jobs.send(Job::Request {
            request,
            received,
            reply,
        });
        let response = match sent.ok().and_then(|()| answer.recv().ok()) {
            Some(r) => r,
            None => Response::Error {
                message: "the agent is stopping".to_owned(),
            },
        };
        if let Err(e) = write_message(&mut stream, &response) {
            if let ProtocolError::TooLarge(n) = e {
                let _ = write_message(
                    &mut stream,
                    &Response::Error {
                        message: format!("the response ({n} bytes) is over the message limit"),
                    },
                );
            }
            return;
        }
    }
}
