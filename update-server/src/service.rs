//! The update service: handles protocol requests against the patch manager, listens on
//! the VMM's Unix API socket, and re-checks patches in transition periodically.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use log::{debug, info, warn};

use crate::guest::Guest;
use crate::manager::{ApplyError, Manager, Patch};
use crate::module::PatchModule;
use crate::protocol::{
    self, BlockerInfo, CallbackInfo, DataInfo, ErrorKind, FunctionInfo, Op, PatchInfo, Request, Response,
};
use crate::signing;

/// How often patches in transition are re-checked.
pub const RECHECK_PERIOD: Duration = Duration::from_millis(250);

/// Serves update requests for one guest: checks signatures, applies and rolls back patches.
pub struct UpdateServer {
    guest: Arc<dyn Guest>,
    manager: Mutex<Manager>,
    trusted: Vec<VerifyingKey>,
}

/// The protocol's view of a patch, for list and status replies.
pub fn patch_info(p: &Patch) -> PatchInfo {
    PatchInfo {
        id: p.id,
        name: p.name.clone(),
        description: p.description.clone(),
        state: p.state,
        functions: p
            .funcs
            .iter()
            .map(|f| FunctionInfo {
                old: f.old_name.clone(),
                old_addr: f.old_addr,
                old_size: f.old_size,
                new: f.new_name.clone(),
                new_addr: f.new_addr,
            })
            .collect(),
        data: p
            .data
            .iter()
            .map(|d| DataInfo {
                name: d.name.clone(),
                addr: d.addr,
                size: d.size,
                mul: d.mul,
                div: d.div,
                protected: d.protected,
                trapped_writes: d.faults.load(Ordering::Relaxed),
                converted_writes: d.converted.load(Ordering::Relaxed),
            })
            .collect(),
        image_addr: p.image_addr,
        image_size: p.image_size,
        pause_us: p.pause_us,
        apply_us: p.apply_us,
        applied_at: p.applied_at,
        checks: p.checks,
        blockers: p
            .blockers
            .iter()
            .map(|b| BlockerInfo {
                who: b.who.clone(),
                at: b.at.clone(),
                pid: b.task.map(|(pid, _)| pid),
            })
            .collect(),
        callbacks: p
            .callbacks
            .iter()
            .map(|c| CallbackInfo {
                kind: c.kind.as_str().into(),
                name: c.name.clone(),
                addr: c.addr,
                limit_ms: c.limit_ms,
            })
            .collect(),
        callback_log: p.callback_log.clone(),
        warnings: p.warnings.clone(),
    }
}

/// The kind of an apply, status or rollback failure, for the client's exit code.
fn error_kind(e: &ApplyError) -> ErrorKind {
    match e {
        ApplyError::NoSuchPatch(_) => ErrorKind::NotFound,
        ApplyError::WrongState { .. } | ApplyError::NotTopmost { .. } => ErrorKind::WrongState,
        ApplyError::Guest(_)
        | ApplyError::Busy(_)
        | ApplyError::CallbackAborted { .. }
        | ApplyError::RevertCallback { .. } => ErrorKind::Failed,
        _ => ErrorKind::Refused,
    }
}

fn apply_error(e: ApplyError, prefix: &str) -> Response {
    Response::error(error_kind(&e), format!("{prefix}{e}"))
}

impl UpdateServer {
    /// A server for `guest` that accepts modules signed by one of the `trusted` keys.
    pub fn new(guest: Arc<dyn Guest>, trusted: Vec<VerifyingKey>) -> Arc<Self> {
        let manager = Mutex::new(Manager::new(guest.as_ref()));
        Arc::new(Self {
            guest,
            manager,
            trusted,
        })
    }

    fn manager(&self) -> std::sync::MutexGuard<'_, Manager> {
        self.manager.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one request.
    pub fn handle(&self, req: &Request, payload: &[u8]) -> Response {
        match req.op {
            Op::Apply => self.apply(payload),
            Op::List => {
                let m = self.manager();
                Response {
                    ok: true,
                    patches: m.patches().iter().map(patch_info).collect(),
                    readonly_pages: Some(self.guest.readonly_pages()),
                    ..Default::default()
                }
            }
            Op::Status => {
                let m = self.manager();
                match req.id {
                    Some(id) => match m.get(id) {
                        Ok(p) => Response {
                            ok: true,
                            patches: vec![patch_info(p)],
                            ..Default::default()
                        },
                        Err(e) => apply_error(e, ""),
                    },
                    None => Response {
                        ok: true,
                        patches: m.patches().iter().map(patch_info).collect(),
                        ..Default::default()
                    },
                }
            }
            Op::Rollback => {
                let Some(id) = req.id else {
                    return Response::error(ErrorKind::BadRequest, "rollback needs a patch id");
                };
                let mut m = self.manager();
                match m.rollback(self.guest.as_ref(), id) {
                    Ok(state) => Response {
                        ok: true,
                        message: format!("patch {id}: original code restored, now {}", state.as_str()),
                        patches: m.get(id).map(|p| vec![patch_info(p)]).unwrap_or_default(),
                        ..Default::default()
                    },
                    Err(e) => apply_error(e, ""),
                }
            }
        }
    }

    fn apply(&self, signed: &[u8]) -> Response {
        let (module, key) = match signing::verify(signed, &self.trusted) {
            Ok(v) => v,
            Err(e) => return Response::error(ErrorKind::Refused, format!("refused: {e}")),
        };
        let m = match PatchModule::parse_limited(module, self.guest.patch_region().size) {
            Ok(m) => m,
            Err(e) => return Response::error(ErrorKind::Refused, format!("refused: invalid patch module: {e}")),
        };
        let mut mgr = self.manager();
        match mgr.apply(self.guest.as_ref(), &m) {
            Ok(id) => {
                let p = mgr.get(id).expect("just applied");
                info!(
                    "applied patch {id} '{}' signed by {}",
                    p.name,
                    signing::fingerprint(&key)
                );
                Response {
                    ok: true,
                    message: format!(
                        "patch {id} '{}' applied ({}): vCPUs paused {} us, apply took {} us",
                        p.name,
                        p.state.as_str(),
                        p.pause_us,
                        p.apply_us
                    ),
                    patches: vec![patch_info(p)],
                    ..Default::default()
                }
            }
            // A callback failed after the jumps went in: the patch exists and was rolled back.
            Err(e @ ApplyError::CallbackAborted { .. }) => apply_error(e, "apply failed: "),
            Err(e) => apply_error(e, "apply failed, guest unchanged: "),
        }
    }

    /// Serves requests on a stream until the peer closes it.
    pub fn serve_stream<S: Read + Write>(&self, mut s: S) {
        loop {
            let resp = match protocol::read_request(&mut s) {
                Ok((req, payload)) => {
                    debug!("request {:?} ({} payload bytes)", req.op, payload.len());
                    self.handle(&req, &payload)
                }
                Err(protocol::ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                Err(e) => {
                    let _ = protocol::write_frame(
                        &mut s,
                        &Response::error(ErrorKind::BadRequest, format!("bad request: {e}")),
                        &[],
                    );
                    return;
                }
            };
            if protocol::write_frame(&mut s, &resp, &[]).is_err() {
                return;
            }
        }
    }

    /// Listens on a Unix socket (removing a stale socket file first).
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        let p: PathBuf = path.into();
        std::thread::Builder::new().name("api-sock".into()).spawn(move || {
            info!("update server listening on {}", p.display());
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let me = me.clone();
                        let _ = std::thread::Builder::new()
                            .name("api-conn".into())
                            .spawn(move || me.serve_stream(c));
                    }
                    Err(e) => warn!("api socket accept: {e}"),
                }
            }
        })?;
        Ok(())
    }

    /// Re-checks patches in transition every `period`.
    pub fn start_rechecks(self: &Arc<Self>, period: Duration) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("recheck".into()).spawn(move || loop {
            std::thread::sleep(period);
            let Some(me) = me.upgrade() else { return };
            let mut m = me.manager();
            m.check_all(me.guest.as_ref());
        });
    }
}
