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
    /// The server did not take the request or answer it within the connection's timeout
    /// ([`Client::connect_timeout`]).
    #[error("the update server did not answer within {}s", .0.as_secs_f64())]
    NoReply(Duration),
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

/// A connected stream to the server.
trait Conn: Read + Write + Send {
    /// Bounds every later read and write (None: wait forever).
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Conn for std::fs::File {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        vsock::set_timeout(self, t)
    }
}

/// One connection to the update server.
pub struct Client {
    conn: Box<dyn Conn>,
    /// The bound on each read and write, if any.
    timeout: Option<Duration>,
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
        Ok(Client { conn, timeout: None })
    }

    /// A client on an already connected Unix stream.
    pub fn from_stream(s: std::os::unix::net::UnixStream) -> Self {
        Client {
            conn: Box::new(s),
            timeout: None,
        }
    }

    /// Connects to `target`; a request then fails with [`ClientError::NoReply`] when the
    /// server takes more than `timeout` to read it or to answer, instead of waiting forever
    /// on a stuck server.
    pub fn connect_timeout(target: &Target, timeout: Duration) -> Result<Self, ClientError> {
        let mut c = Self::connect(target)?;
        c.timeout = Some(timeout);
        c.conn
            .set_timeout(Some(timeout))
            .map_err(|source| ClientError::Connect {
                target: target.to_string(),
                source,
            })?;
        Ok(c)
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
            return protocol::read_header(&mut self.conn).map_err(|_| self.no_reply(sent));
        }
        protocol::read_header(&mut self.conn).map_err(|e| self.no_reply(e))
    }

    /// `e`, or [`ClientError::NoReply`] when it is the connection's timeout expiring.
    fn no_reply(&self, e: ProtocolError) -> ClientError {
        match (&e, self.timeout) {
            (ProtocolError::Io(io), Some(t))
                if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                ClientError::NoReply(t)
            }
            _ => ClientError::Protocol(e),
        }
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

    /// SO_RCVTIMEO and SO_SNDTIMEO of the socket `f` (None or zero: no limit).
    pub fn set_timeout(f: &File, t: Option<std::time::Duration>) -> io::Result<()> {
        let t = t.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: `tv` is a valid timeval that outlives the call and the length is its
            // size; the fd is an open socket owned by `f`.
            let rc = unsafe {
                libc::setsockopt(
                    f.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &tv as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_never_answers_times_out() {
        let dir = std::env::temp_dir().join(format!("lucos-client-timeout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Accepts and holds the connection, never reading or answering.
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let mut c = Client::connect_timeout(&Target::Unix(path), Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        let e = c.request(Op::List, None, &[]).expect_err("no reply: an error");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "gave up after {:?}",
            t0.elapsed()
        );
        assert!(matches!(e, ClientError::NoReply(_)), "{e}");
        assert_eq!(e.to_string(), "the update server did not answer within 0.3s");
        drop(held.join());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
