//! The lucos wire protocol, spoken on the VMM's Unix API socket and on virtio-vsock:
//!
//! ```text
//! frame = header_len: u32 LE | header: JSON (header_len bytes) | payload (header.payload_len bytes)
//! ```
//!
//! A request header is `{"op": "apply"|"list"|"status"|"rollback", "id": N?, "payload_len": N}`;
//! `apply` carries the signed module as payload. A response header is
//! `{"ok": true, "message": "...", "patches": [...]}` or `{"ok": false, "error": "..."}`.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The vsock port the update server listens on at the host end (CID 2, the VMM). A guest
/// program connects with `socket(AF_VSOCK, SOCK_STREAM)` to `{cid: 2, port: VSOCK_PORT}`
/// (`lucosctl --vsock`) and speaks the same frames as on the Unix API socket. 1024 is the
/// first unprivileged port (only binding to lower ports needs CAP_NET_BIND_SERVICE).
pub const VSOCK_PORT: u32 = 1024;
/// Largest header accepted.
pub const MAX_HEADER: u32 = 64 * 1024;
/// Largest payload accepted (a patch module).
pub const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The stream failed or ended early (an `UnexpectedEof` before a header is a clean close).
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The header length exceeds [`MAX_HEADER`]; the value is the length announced.
    #[error("header of {0} bytes exceeds the {MAX_HEADER}-byte limit")]
    HeaderTooLarge(u32),
    /// The request's `payload_len` exceeds [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u64),
    /// The header is not valid JSON for the expected type.
    #[error("malformed header: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a request asks for; lower-case in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Apply the signed module carried as payload.
    Apply,
    /// List every patch of the guest.
    List,
    /// Report one patch (with `id`) or all of them.
    Status,
    /// Roll back patch `id`.
    Rollback,
}

/// A request header; `payload_len` bytes of payload follow it on the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Patch the request is about: needed by `rollback`, optional for `status`, ignored otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Bytes of payload following the header: the signed module for `apply`, else 0.
    #[serde(default)]
    pub payload_len: u64,
}

/// Where a patch is in its life (see [`crate::manager`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchState {
    /// Jumps installed; some vCPU or task may still run an old function.
    Transition,
    /// No vCPU and no task stack refers to an old function any more: the update is complete.
    Committed,
    /// Original bytes restored; some thread may still run the patch's code, which stays allocated.
    RollingBack,
    /// Rolled back, and the patch's memory freed.
    RolledBack,
}

impl PatchState {
    /// Kebab-case name, as in status output and the serialized form (e.g. `rolling-back`).
    pub fn as_str(self) -> &'static str {
        match self {
            PatchState::Transition => "transition",
            PatchState::Committed => "committed",
            PatchState::RollingBack => "rolling-back",
            PatchState::RolledBack => "rolled-back",
        }
    }
}

impl std::fmt::Display for PatchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One function a patch redirects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FunctionInfo {
    /// The guest kernel function replaced.
    pub old: String,
    /// Its address.
    pub old_addr: u64,
    /// Its size in bytes.
    pub old_size: u64,
    /// The replacement in the patch module.
    pub new: String,
    /// The replacement's address in the patch region.
    pub new_addr: u64,
}

/// One global a data patch converts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataInfo {
    /// The kernel global.
    pub name: String,
    /// Its address.
    pub addr: u64,
    /// Its size in bytes (4 or 8).
    pub size: u64,
    /// The new code keeps `old * mul / div`.
    pub mul: u64,
    /// See `mul`.
    pub div: u64,
    /// Whether its page is write-protected right now (during a transition).
    pub protected: bool,
    /// Guest writes to its page trapped so far.
    pub trapped_writes: u64,
    /// Trapped writes whose value was converted.
    pub converted_writes: u64,
}

/// A callback of a patch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallbackInfo {
    /// `apply`, `revert` or `thread`.
    pub kind: String,
    /// The callback function.
    pub name: String,
    /// Its address in the patch region.
    pub addr: u64,
    /// Its time limit in milliseconds.
    pub limit_ms: u64,
}

/// Who keeps a transition from finishing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockerInfo {
    /// `vCPU N` or `task PID (comm, state)`.
    pub who: String,
    /// Where: the function (or patch code) it is in, with the address.
    pub at: String,
    /// The task's pid (None for a vCPU).
    pub pid: Option<i32>,
}

/// One patch, as reported to clients: every field typed, nothing formatted for people
/// (`lucosctl` does that; `--json` prints these fields).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatchInfo {
    /// Patch number, unique per guest, from 1.
    pub id: u32,
    /// Name from the module's `.lucos.info`.
    pub name: String,
    /// Description from the module's `.lucos.info` (may be empty).
    pub description: String,
    /// Where the patch is in its life.
    pub state: PatchState,
    /// The functions it redirects.
    pub functions: Vec<FunctionInfo>,
    /// The globals it converts (data patches).
    pub data: Vec<DataInfo>,
    /// Guest address of the patch's code and data.
    pub image_addr: u64,
    /// Size of the patch's code and data, in bytes.
    pub image_size: u64,
    /// Microseconds the vCPUs were stopped to install the jumps.
    pub pause_us: u64,
    /// Microseconds the whole apply request took.
    pub apply_us: u64,
    /// When it was applied, in seconds since the Unix epoch.
    pub applied_at: u64,
    /// Stack inspections run so far.
    pub checks: u32,
    /// What the last stack inspection found in the waited-on code.
    pub blockers: Vec<BlockerInfo>,
    /// The patch's callbacks.
    pub callbacks: Vec<CallbackInfo>,
    /// One line per callback run, with its outcome and duration.
    pub callback_log: Vec<String>,
    /// What the module parser noted (e.g. sections applied with their build-time default).
    pub warnings: Vec<String>,
    /// The guest modules the patch uses, pinned (not unloadable) until it is rolled back.
    #[serde(default)]
    pub modules: Vec<String>,
}

/// What kind of failure a reply reports; `lucosctl` picks its exit code from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request itself is malformed (e.g. `rollback` without an id).
    BadRequest,
    /// The module was refused before anything was written to the guest: not signed, not
    /// trusted, malformed, does not link, fails a run-pre check.
    Refused,
    /// No patch with that id.
    NotFound,
    /// The patch is not in a state that allows the request (e.g. already rolled back, or
    /// another patch sits on top of it).
    WrongState,
    /// The guest side failed (memory, pausing, a callback); the patch was rolled back.
    Failed,
}

/// The header of a reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Outcome of a successful request, for people (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Why the request failed; set only when `ok` is false.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// What kind of failure; set only when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// Patches the request concerns (every patch for `list`, and for `status` without an id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchInfo>,
    /// Guest pages write-protected right now (`list` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly_pages: Option<u64>,
}

impl Response {
    /// A failed reply of kind `kind` carrying `e`'s message.
    pub fn error(kind: ErrorKind, e: impl ToString) -> Self {
        Response {
            ok: false,
            error: e.to_string(),
            error_kind: Some(kind),
            ..Default::default()
        }
    }
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized, H: Serialize>(
    w: &mut W,
    header: &H,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let h = serde_json::to_vec(header)?;
    w.write_all(&(h.len() as u32).to_le_bytes())?;
    w.write_all(&h)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads a frame's header (the payload, if any, follows on the stream).
pub fn read_header<R: Read + ?Sized, H: for<'de> Deserialize<'de>>(r: &mut R) -> Result<H, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(ProtocolError::HeaderTooLarge(len));
    }
    let mut h = vec![0u8; len as usize];
    r.read_exact(&mut h)?;
    Ok(serde_json::from_slice(&h)?)
}

/// Reads a request and its payload.
pub fn read_request<R: Read + ?Sized>(r: &mut R) -> Result<(Request, Vec<u8>), ProtocolError> {
    let req: Request = read_header(r)?;
    if req.payload_len > MAX_PAYLOAD {
        return Err(ProtocolError::PayloadTooLarge(req.payload_len));
    }
    // Grows with what arrives: announcing a large payload reserves nothing.
    let mut payload = Vec::new();
    r.take(req.payload_len).read_to_end(&mut payload)?;
    if payload.len() as u64 != req.payload_len {
        return Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("payload ended after {} of {} bytes", payload.len(), req.payload_len),
        )));
    }
    Ok((req, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut buf = Vec::new();
        let req = Request {
            op: Op::Apply,
            id: None,
            payload_len: 3,
        };
        write_frame(&mut buf, &req, b"abc").unwrap();
        let (r, p) = read_request(&mut &buf[..]).unwrap();
        assert_eq!((r, p), (req, b"abc".to_vec()));

        let mut buf = Vec::new();
        write_frame(&mut buf, &Response::error(ErrorKind::Refused, "nope"), &[]).unwrap();
        let resp: Response = read_header(&mut &buf[..]).unwrap();
        assert!(!resp.ok);
        assert_eq!(resp.error, "nope");
    }

    #[test]
    fn rejects_bad_frames() {
        let mut buf = (MAX_HEADER + 1).to_le_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        assert!(matches!(
            read_request(&mut &buf[..]),
            Err(ProtocolError::HeaderTooLarge(_))
        ));
        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"op": "explode"}), &[]).unwrap();
        assert!(matches!(read_request(&mut &buf[..]), Err(ProtocolError::Json(_))));
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Request {
                op: Op::Apply,
                id: None,
                payload_len: 10,
            },
            b"short",
        )
        .unwrap();
        assert!(matches!(
            read_request(&mut &buf[..]),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Request {
                op: Op::Apply,
                id: None,
                payload_len: MAX_PAYLOAD + 1,
            },
            b"",
        )
        .unwrap();
        assert!(matches!(
            read_request(&mut &buf[..]),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
    }
}
