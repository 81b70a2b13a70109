//! A client of the agent's socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{read_message, write_message, ProtocolError, Request, Response};

/// How long a client waits for an answer (an apply may rebuild many tables).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent socket at {0}: is `palisade agent` running? (another socket: --socket PATH)"
    )]
    NoAgent(PathBuf),
    #[error(
        "permission denied on {0}: the agent's API is root-only (the socket is mode 0600, owned \
         by root); run this command as root"
    )]
    PermissionDenied(PathBuf),
    #[error("the agent at {0} is not running (stale socket: nobody accepts connections)")]
    NotRunning(PathBuf),
    #[error("agent socket {socket}: {source}")]
    Io { socket: PathBuf, source: io::Error },
    #[error("talking to the agent at {socket}: {source}")]
    Protocol {
        socket: PathBuf,
        source: ProtocolError,
    },
}

/// One connection to the agent.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NoAgent(socket.to_path_buf()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_path_buf()),
            io::ErrorKind::ConnectionRefused => ClientError::NotRunning(socket.to_path_buf()),
            _ => ClientError::Io {
                socket: socket.to_path_buf(),
                source: e,
            },
        })?;
        let io_err = |source| ClientError::Io {
            socket: socket.to_path_buf(),
            source,
        };
        stream
            .set_read_timeout(Some(RESPONSE_TIMEOUT))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(RESPONSE_TIMEOUT))
            .map_err(io_err)?;
        Ok(Client {
            stream,
            socket: socket.to_path_buf(),
        })
    }

    /// Sends one request and waits for its response.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let proto = |source| ClientError::Protocol {
            socket: self.socket.clone(),
            source,
        };
        if let Err(e) = write_message(&mut self.stream, request) {
            // The agent may have refused the connection with an answer before closing it
            // (a client that is not root): that answer says more than a broken pipe.
            return match read_message(&mut self.stream) {
                Ok(response) => Ok(response),
                Err(_) => Err(proto(e)),
            };
        }
        read_message(&mut self.stream).map_err(proto)
    }
}

/// Connects, sends one request, returns the response.
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    Client::connect(socket)?.request(request)
}
