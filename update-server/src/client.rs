//! A client of the update server: connects over the VMM's Unix API socket or (inside the
//! guest) AF_VSOCK, sends requests, waits for states. Used by `lucosctl` and by the tests.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::protocol::{self, ErrorKind, Op, PatchInfo, PatchState, ProtocolError, Request, Response};

/// Where the update server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The Unix API socket given to `lucos-vmm run --api-sock`.
    Unix(PathBuf),
    /// AF_VSOCK to the VMM (CID 2) on this port: from inside the guest.
    Vsock(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Vsock(port) => write!(f, "vsock cid {} port {port}", vsock::HOST_CID),
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("connect {target}: {source}")]
    Connect {
        /// Where we tried.
        target: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The exchange broke (connection reset, malformed reply).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The server answered with a failure.
    #[error("{message}")]
    Refused {
        /// What kind of failure.
        kind: Option<ErrorKind>,
        /// The server's message.
        message: String,
    },
    /// The payload is larger than the server accepts; nothing was sent.
    #[error("{what} is {len} bytes, more than the {max} bytes the update server accepts", max = protocol::MAX_PAYLOAD)]
    PayloadTooLarge {
        /// What the payload is.
        what: &'static str,
        /// Its size.
        len: u64,
    },
    /// A `status` reply without the patch.
    #[error("the server's status reply names no patch")]
    EmptyStatus,
    /// [`Client::wait_state`] gave up.
    #[error("patch {id} still {state} after {}s; waiting on: {waiting}", .after.as_secs())]
    WaitTimeout {
        /// The patch.
        id: u32,
        /// Its state at the end.
        state: PatchState,
        /// How long we waited.
        after: Duration,
        /// Its blockers at the end, as `who in where`.
        waiting: String,
    },
}

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// One connection to the update server.
pub struct Client {
    conn: Box<dyn Conn>,
}

impl Client {
    /// Connects to `target`.
    pub fn connect(target: &Target) -> Result<Self, ClientError> {
        let err = |source| ClientError::Connect {
            target: target.to_string(),
            source,
        };
        let conn: Box<dyn Conn> = match target {
            Target::Unix(path) => Box::new(std::os::unix::net::UnixStream::connect(path).map_err(err)?),
            Target::Vsock(port) => Box::new(vsock::connect(vsock::HOST_CID, *port).map_err(err)?),
        };
        Ok(Client { conn })
    }

    /// A client on an already connected stream.
    pub fn from_stream<S: Read + Write + Send + 'static>(s: S) -> Self {
        Client { conn: Box::new(s) }
    }

    /// Sends one request and returns the reply, whether it reports success or not. A
    /// payload over [`protocol::MAX_PAYLOAD`] is refused without sending anything; when the
    /// server stops reading (it refused the request), its reply is still read.
    pub fn request(&mut self, op: Op, id: Option<u32>, payload: &[u8]) -> Result<Response, ClientError> {
        let len = payload.len() as u64;
        if len > protocol::MAX_PAYLOAD {
            return Err(ClientError::PayloadTooLarge {
                what: "the patch module",
                len,
            });
        }
        let req = Request {
            op,
            id,
            payload_len: len,
        };
        if let Err(sent) = protocol::write_frame(&mut self.conn, &req, payload) {
            // The server may have answered and closed: its reply explains why.
            return protocol::read_header(&mut self.conn).map_err(|_| ClientError::Protocol(sent));
        }
        Ok(protocol::read_header(&mut self.conn)?)
    }

    /// Sends one request; a failure reply becomes [`ClientError::Refused`].
    pub fn call(&mut self, op: Op, id: Option<u32>, payload: &[u8]) -> Result<Response, ClientError> {
        let r = self.request(op, id, payload)?;
        if r.ok {
            Ok(r)
        } else {
            Err(ClientError::Refused {
                kind: r.error_kind,
                message: r.error,
            })
        }
    }

    /// The status of patch `id`.
    pub fn status(&mut self, id: u32) -> Result<PatchInfo, ClientError> {
        let r = self.call(Op::Status, Some(id), &[])?;
        r.patches.into_iter().next().ok_or(ClientError::EmptyStatus)
    }

    /// Polls the status of patch `id` every `poll` until it is in state `want`, for at most
    /// `timeout`.
    pub fn wait_state(
        &mut self,
        id: u32,
        want: PatchState,
        timeout: Duration,
        poll: Duration,
    ) -> Result<PatchInfo, ClientError> {
        let start = Instant::now();
        loop {
            let p = self.status(id)?;
            if p.state == want {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                let waiting: Vec<String> = p.blockers.iter().map(|b| format!("{} in {}", b.who, b.at)).collect();
                return Err(ClientError::WaitTimeout {
                    id,
                    state: p.state,
                    after: start.elapsed(),
                    waiting: if waiting.is_empty() {
                        "-".into()
                    } else {
                        waiting.join("; ")
                    },
                });
            }
            std::thread::sleep(poll);
        }
    }
}

/// AF_VSOCK client sockets (Linux), for use inside the guest.
mod vsock {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// The host's CID (the VMM).
    pub const HOST_CID: u32 = 2;

    /// Connects a stream socket to `cid:port`; the socket reads and writes like a file.
    pub fn connect(cid: u32, port: u32) -> io::Result<File> {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket we just created and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a properly initialized sockaddr_vm that outlives the call and
        // `len` is its size; `fd` is an open socket.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(File::from(fd))
    }
}
