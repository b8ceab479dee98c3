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

/// Summary of one patch, as reported to clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatchInfo {
    /// Patch number, unique per guest, from 1.
    pub id: u32,
    /// Name from the module's `.lucos.info`.
    pub name: String,
    /// State, as [`PatchState::as_str`](crate::manager::PatchState::as_str) writes it.
    pub state: String,
    /// Guest kernel functions the patch replaces.
    pub functions: Vec<String>,
    /// Microseconds the vCPUs were stopped to install the jumps.
    pub pause_us: u64,
    /// Microseconds the whole apply request took.
    pub apply_us: u64,
    /// Stack inspections run so far.
    pub checks: u32,
    /// What the last stack inspection found in the waited-on code, as `who in where`.
    pub waiting_on: Vec<String>,
    /// Multi-line report, as `lucosctl status` prints it.
    pub details: String,
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
    /// Patches the request concerns (every patch for `list`, and for `status` without an id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchInfo>,
}

impl Response {
    /// A failed reply carrying `e`'s message.
    pub fn error(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: e.to_string(),
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
    let mut payload = vec![0u8; req.payload_len as usize];
    r.read_exact(&mut payload)?;
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
        write_frame(&mut buf, &Response::error("nope"), &[]).unwrap();
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
        assert!(matches!(read_request(&mut &buf[..]), Err(ProtocolError::Io(_))));
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
