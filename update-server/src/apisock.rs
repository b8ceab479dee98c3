//! The host's Unix API socket: created safely (never over a file that is not a stale
//! socket, never over a live server's socket, mode 0600 from the start), removed at exit
//! only while the path is still ours, and served only to the VMM's own user and root
//! (`SO_PEERCRED`). The accept loop backs off when the process is out of descriptors.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{info, warn};
use thiserror::Error;

/// How long the accept loop sleeps after the process or system ran out of descriptors
/// (or memory) before accepting again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the API socket could not be created.
#[derive(Debug, Error)]
pub enum ApiSocketError {
    /// Something other than a socket is at the path; it is left alone.
    #[error("{0}: exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// A server (another lucos-vmm?) accepts connections on the socket at the path.
    #[error("{0}: another process is serving this socket")]
    InUse(PathBuf),
    /// Inspecting, removing, binding or setting the mode failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// The API socket file this process created: removed on drop if the path still names it
/// (same device and inode), so a socket another VMM created there since is left alone.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    /// Device, inode and change time (s, ns) of the socket file: inode numbers are reused
    /// once a file is gone, the change time tells a new file from ours.
    id: (u64, u64, i64, i64),
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl ApiSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && file_id(&m) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("api socket {}: cannot remove it: {e}", self.path.display());
                }
            }
            Ok(_) => info!(
                "api socket {}: replaced by another file since; leaving it",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Creates the listening socket at `path`: a stale socket there (nobody accepts on it) is
/// replaced; anything else there is an error. The socket is created with mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, ApiSocket), ApiSocketError> {
    let err = |what, source| ApiSocketError::Io {
        path: path.into(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiSocketError::NotASocket(path.into())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiSocketError::InUse(path.into())),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                info!("api socket {}: removing a stale socket", path.display());
                std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?;
            }
            Err(e) => return Err(err("probing the existing socket", e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspecting the path", e)),
    }
    // The socket file gets mode 0600 at creation (umask is process-wide, so it is set only
    // around the bind), and again explicitly in case the umask was changed meanwhile.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| err("binding", e))?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(err("setting mode 0600", e));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| err("inspecting the new socket", e))?;
    let guard = ApiSocket {
        path: path.into(),
        id: file_id(&m),
    };
    Ok((listener, guard))
}

/// The user id of the process at the other end of `s` (`SO_PEERCRED`).
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    // SAFETY: ucred is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and describe a ucred; `s` is an open
    // Unix socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a peer with user id `peer` may use the API of a VMM running as `me`: the same
/// user, or root.
pub fn uid_allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

/// The effective user id of this process.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid cannot fail and has no arguments.
    unsafe { libc::geteuid() }
}

/// How long to wait before the next accept after `e`: a pause when descriptors or memory
/// ran out (retrying at once would spin), none for a connection that went away.
pub fn accept_backoff(e: &io::Error) -> Option<Duration> {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Some(ACCEPT_BACKOFF),
        _ => None,
    }
}

/// Accepts until `accept` returns `None`, handing each connection to `handle`; after a
/// failure that would recur at once (out of descriptors), sleeps [`accept_backoff`] first.
pub fn accept_loop<T>(mut accept: impl FnMut() -> Option<io::Result<T>>, mut handle: impl FnMut(T)) {
    let mut failing = false;
    while let Some(r) = accept() {
        match r {
            Ok(c) => {
                failing = false;
                handle(c);
            }
            Err(e) => {
                if !failing {
                    warn!("api socket accept: {e}");
                }
                if let Some(pause) = accept_backoff(&e) {
                    failing = true;
                    std::thread::sleep(pause);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lucos-apisock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_regular_file_is_refused_and_kept() {
        let d = dir("file");
        let p = d.join("api.sock");
        std::fs::write(&p, "precious").unwrap();
        assert!(matches!(bind(&p), Err(ApiSocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
        // A symlink to it too: the link is not a socket.
        let l = d.join("link.sock");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(matches!(bind(&l), Err(ApiSocketError::NotASocket(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced() {
        let d = dir("live");
        let p = d.join("api.sock");
        let (live, guard) = bind(&p).unwrap();
        assert!(matches!(bind(&p), Err(ApiSocketError::InUse(_))));
        // Still served by the first listener.
        UnixStream::connect(&p).unwrap();
        drop(live);
        // Nobody accepts any more: stale, so it is replaced; the old guard must not remove
        // the new socket.
        let (_l2, g2) = bind(&p).unwrap();
        drop(guard);
        assert!(p.exists(), "the old owner removed the new socket");
        drop(g2);
        assert!(!p.exists(), "the owner removes its socket");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_socket_is_private_whatever_the_umask() {
        let d = dir("mode");
        let p = d.join("api.sock");
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let r = bind(&p);
        // SAFETY: restoring it.
        unsafe { libc::umask(old) };
        let (_l, _g) = r.unwrap();
        let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(_g);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn peer_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), my_uid());
        assert!(uid_allowed(1000, 1000) && uid_allowed(0, 1000));
        assert!(!uid_allowed(1001, 1000));
    }

    #[test]
    fn accept_backs_off_when_out_of_descriptors() {
        let t0 = Instant::now();
        let mut calls = 0u32;
        accept_loop(
            || {
                calls += 1;
                (t0.elapsed() < Duration::from_millis(300))
                    .then(|| Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE)))
            },
            |_| {},
        );
        assert!(calls <= 6, "accept retried {calls} times in 300 ms");
        // Other failures do not slow accepting down.
        assert_eq!(accept_backoff(&io::Error::from_raw_os_error(libc::ECONNABORTED)), None);
    }
}
