//! The update service: handles protocol requests against the patch manager, listens on
//! the VMM's Unix API socket, and re-checks patches in transition periodically.
//!
//! Who may do what depends on the channel a request came in on ([`Caller`]): the host's
//! Unix API socket (the VMM's own user and root) may do everything; a guest program on
//! vsock gets the rights given by [`GuestRights`] (`lucos-vmm run --vsock-api`): never
//! rollback or cancel. A module must be signed for the running kernel build, and per patch
//! name only a newer version than the highest applied is accepted (the host may re-apply
//! the highest version after rolling it back), so a replayed or older module is refused.
//!
//! Connections are bounded per channel ([`Limits`]), idle and slow ones time out, and
//! payloads in flight share one memory budget.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use log::{debug, info, warn};

use crate::apisock::{self, ApiSocket, ApiSocketError};
use crate::guest::Guest;
use crate::manager::{ApplyError, Manager, Patch, PatchState};
use crate::module::PatchModule;
use crate::protocol::{
    self, BlockerInfo, CallbackInfo, DataInfo, ErrorKind, FunctionInfo, Op, PatchInfo, ProtocolError, Request,
    Response, MAX_HEADER, MAX_PAYLOAD,
};
use crate::signing;

/// How often patches in transition are re-checked.
pub const RECHECK_PERIOD: Duration = Duration::from_millis(250);
/// Rolled-back patch records kept for `list`/`status` (older ones are dropped).
pub const KEEP_ROLLED_BACK: usize = 16;

/// What a guest program may ask over vsock (`lucos-vmm run --vsock-api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GuestRights {
    /// Nothing: vsock connections to the update port are reset.
    Off,
    /// `list` and `status` only (the default).
    #[default]
    ReadOnly,
    /// Also `apply` of signed modules (still never rollback or cancel).
    Apply,
}

/// Which channel a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The host's Unix API socket: every request.
    Host,
    /// A guest program over vsock: what [`GuestRights`] allows.
    Guest,
}

/// Resource bounds of the service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once on each channel; more are answered with an error and closed.
    pub connections: usize,
    /// How long a connection may sit between requests (and a header may take to arrive).
    pub idle: Duration,
    /// How long a request's payload may take to arrive, and a reply to be taken.
    pub transfer: Duration,
    /// Payload bytes buffered at once over all connections.
    pub payload_budget: u64,
    /// Bytes of a refused payload read and dropped so that its sender can read the reply.
    pub drain: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 8,
            idle: Duration::from_secs(60),
            transfer: Duration::from_secs(120),
            payload_budget: 2 * MAX_PAYLOAD,
            drain: 4 * MAX_PAYLOAD,
        }
    }
}

/// What the server accepts and from whom.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Keys whose signatures are accepted (`--trusted-key`).
    pub trusted: Vec<VerifyingKey>,
    /// The running kernel's id ([`signing::kernel_id`]): modules must be signed for it.
    pub kernel_id: Vec<u8>,
    /// What guest programs may do over vsock.
    pub guest: GuestRights,
    /// Resource bounds.
    pub limits: Limits,
}

/// Versions applied per patch name, for refusing replays and downgrades.
#[derive(Default)]
struct Versions {
    /// Highest version applied per patch name.
    highest: HashMap<String, u64>,
    /// The version of each patch id.
    of_patch: HashMap<u32, u64>,
}

/// Serves update requests for one guest: checks signatures, applies and rolls back patches.
pub struct UpdateServer {
    guest: Arc<dyn Guest>,
    manager: Mutex<Manager>,
    policy: Policy,
    versions: Mutex<Versions>,
    /// Connections being served: host, guest.
    active: [AtomicUsize; 2],
    /// Payload bytes buffered right now.
    buffered: AtomicU64,
}

/// A connection slot on one channel, given back on drop.
pub struct Slot {
    server: Arc<UpdateServer>,
    caller: Caller,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.server.active[self.caller as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Payload bytes reserved from the budget, given back on drop.
struct Reservation<'a>(&'a AtomicU64, u64);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// What [`UpdateServer::next_request`] found on a stream.
enum Next {
    /// A request to handle, with its payload.
    Request(Request, Vec<u8>),
    /// A request was refused and answered; the stream goes on.
    Replied,
    /// The stream ended, broke or timed out.
    Close,
    /// A malformed request: send this reply and close.
    Fatal(Response),
}

/// A reader that fails with `TimedOut` once `until` has passed.
struct Deadline<'a> {
    s: &'a UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        match (&*self.s).read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(std::io::ErrorKind::TimedOut.into()),
            r => r,
        }
    }
}

/// Drops `resp`'s oldest patches (and, for a single patch, its longest lists) until its
/// header fits in [`MAX_HEADER`], saying so in its message.
pub fn fit_reply(mut resp: Response) -> Response {
    let size = |r: &Response| serde_json::to_vec(r).map(|v| v.len()).unwrap_or(usize::MAX);
    if size(&resp) <= MAX_HEADER as usize {
        return resp;
    }
    let total = resp.patches.len();
    let note = |r: &mut Response, dropped: usize| {
        let n =
            format!("{dropped} of {total} patches left out (reply limit {MAX_HEADER} bytes); ask `status ID` for one");
        r.message = if r.message.is_empty() {
            n
        } else {
            format!("{}; {n}", r.message)
        };
    };
    let mut dropped = 0;
    while resp.patches.len() > 1 && size(&resp) > MAX_HEADER as usize - 200 {
        // Rolled-back records go first, oldest first; then the oldest of the others.
        let i = resp
            .patches
            .iter()
            .position(|p| p.state == PatchState::RolledBack)
            .unwrap_or(0);
        resp.patches.remove(i);
        dropped += 1;
    }
    if dropped > 0 {
        note(&mut resp, dropped);
    }
    if !resp.patches.is_empty() && size(&resp) > MAX_HEADER as usize {
        while size(&resp) > MAX_HEADER as usize {
            let p = &mut resp.patches[0];
            if p.callback_log.len() > 1 {
                let n = p.callback_log.len() / 2;
                p.callback_log.drain(..n);
            } else if p.blockers.len() > 1 {
                p.blockers.truncate(p.blockers.len() / 2);
            } else if p.warnings.len() > 1 {
                p.warnings.truncate(p.warnings.len() / 2);
            } else {
                p.callback_log.clear();
                p.blockers.clear();
                p.warnings.clear();
                break;
            }
        }
        let n = "older callback log lines, blockers or warnings left out (reply limit)";
        resp.message = if resp.message.is_empty() {
            n.into()
        } else {
            format!("{}; {n}", resp.message)
        };
    }
    resp
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
        modules: p.modules.iter().map(|m| m.name.clone()).collect(),
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
        | ApplyError::Inconsistent { .. }
        | ApplyError::CallbackAborted { .. }
        | ApplyError::RevertCallback { .. } => ErrorKind::Failed,
        _ => ErrorKind::Refused,
    }
}

fn apply_error(e: ApplyError, prefix: &str) -> Response {
    Response::error(error_kind(&e), format!("{prefix}{e}"))
}

impl UpdateServer {
    /// A server for `guest` under `policy`.
    pub fn new(guest: Arc<dyn Guest>, policy: Policy) -> Arc<Self> {
        let manager = Mutex::new(Manager::new(guest.as_ref()));
        Arc::new(Self {
            guest,
            manager,
            policy,
            versions: Mutex::new(Versions::default()),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
            buffered: AtomicU64::new(0),
        })
    }

    /// What guest programs may do over vsock.
    pub fn guest_rights(&self) -> GuestRights {
        self.policy.guest
    }

    fn manager(&self) -> std::sync::MutexGuard<'_, Manager> {
        self.manager.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, Versions> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why `caller` may not make request `op`, if it may not.
    fn forbidden(&self, caller: Caller, op: &Op) -> Option<String> {
        let rights = match caller {
            Caller::Host => return None,
            Caller::Guest => self.policy.guest,
        };
        match (op, rights) {
            (Op::List | Op::Status, GuestRights::ReadOnly | GuestRights::Apply) => None,
            (Op::Apply, GuestRights::Apply) => None,
            (Op::Apply, _) => Some(
                "apply is not allowed over vsock on this VM (lucos-vmm run --vsock-api read-only): \
                 submit the patch on the host's API socket"
                    .into(),
            ),
            (Op::Rollback, _) => Some(
                "rollback and cancel are not allowed over vsock: only the host's API socket may undo a patch".into(),
            ),
            (_, GuestRights::Off) => Some("the update API is off on vsock for this VM".into()),
        }
    }

    /// A connection slot on `caller`'s channel, or None when [`Limits::connections`] are
    /// already served there.
    pub fn admit(self: &Arc<Self>, caller: Caller) -> Option<Slot> {
        let n = &self.active[caller as usize];
        let max = self.policy.limits.connections;
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < max).then_some(v + 1))
            .ok()?;
        Some(Slot {
            server: self.clone(),
            caller,
        })
    }

    /// Handles one request from `caller`.
    pub fn handle(&self, caller: Caller, req: &Request, payload: &[u8]) -> Response {
        if let Some(why) = self.forbidden(caller, &req.op) {
            warn!("refused {:?} from {caller:?}: {why}", req.op);
            return Response::error(ErrorKind::Refused, why);
        }
        let resp = match req.op {
            Op::Apply => self.apply(caller, payload),
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
                let r = match m.rollback(self.guest.as_ref(), id) {
                    Ok(state) => Response {
                        ok: true,
                        message: format!("patch {id}: original code restored, now {}", state.as_str()),
                        patches: m.get(id).map(|p| vec![patch_info(p)]).unwrap_or_default(),
                        ..Default::default()
                    },
                    Err(e) => apply_error(e, ""),
                };
                m.prune(KEEP_ROLLED_BACK);
                r
            }
        };
        fit_reply(resp)
    }

    /// Whether a module named `name` at `version` may be applied by `caller` now.
    fn check_version(&self, m: &Manager, caller: Caller, name: &str, version: u64) -> Result<(), String> {
        let v = self.versions();
        let Some(&highest) = v.highest.get(name) else {
            return Ok(());
        };
        if version > highest {
            return Ok(());
        }
        if version < highest {
            return Err(format!(
                "patch '{name}' version {version} is older than version {highest}, already applied (downgrade)"
            ));
        }
        let live = m.patches().iter().find(|p| {
            p.name == name
                && v.of_patch.get(&p.id) == Some(&version)
                && matches!(p.state, PatchState::Transition | PatchState::Committed)
        });
        if let Some(p) = live {
            return Err(format!(
                "patch '{name}' version {version} is already applied as patch {}",
                p.id
            ));
        }
        match caller {
            Caller::Host => Ok(()),
            Caller::Guest => Err(format!(
                "patch '{name}' version {version} was applied and rolled back: only the host may apply it \
                 again (replay)"
            )),
        }
    }

    fn apply(&self, caller: Caller, signed: &[u8]) -> Response {
        let refused = |e: String| Response::error(ErrorKind::Refused, format!("refused: {e}"));
        let v = match signing::verify(signed, &self.policy.trusted) {
            Ok(v) => v,
            Err(e) => return refused(e.to_string()),
        };
        if v.binding.kernel_id != self.policy.kernel_id {
            return refused(format!(
                "module is signed for kernel build {}, the guest runs {}",
                signing::hex(&v.binding.kernel_id),
                signing::hex(&self.policy.kernel_id)
            ));
        }
        let m = match PatchModule::parse_limited(v.module, self.guest.patch_region().size) {
            Ok(m) => m,
            Err(e) => return refused(format!("invalid patch module: {e}")),
        };
        let mut mgr = self.manager();
        if let Err(e) = self.check_version(&mgr, caller, &m.name, v.binding.version) {
            warn!("refused apply from {caller:?}: {e}");
            return refused(e);
        }
        let r = match mgr.apply(self.guest.as_ref(), &m) {
            Ok(id) => {
                let mut versions = self.versions();
                let h = versions.highest.entry(m.name.clone()).or_insert(0);
                *h = (*h).max(v.binding.version);
                versions.of_patch.insert(id, v.binding.version);
                drop(versions);
                let p = mgr.get(id).expect("just applied");
                info!(
                    "applied patch {id} '{}' version {} from {caller:?}, signed by {}",
                    p.name,
                    v.binding.version,
                    signing::fingerprint(&v.key)
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
        };
        mgr.prune(KEEP_ROLLED_BACK);
        r
    }

    /// Reads and drops up to `n` bytes (at most [`Limits::drain`]) of a refused payload, so
    /// that its sender finishes writing and reads the reply; whether all `n` were read.
    fn drain(&self, s: &UnixStream, n: u64) -> bool {
        if n > self.policy.limits.drain {
            return false;
        }
        let mut r = Deadline {
            s,
            until: Instant::now() + self.policy.limits.transfer,
        };
        std::io::copy(&mut (&mut r).take(n), &mut std::io::sink()).is_ok_and(|got| got == n)
    }

    /// Reads one request, answering it at once when it is refused before its payload.
    fn next_request(&self, s: &mut UnixStream, caller: Caller) -> Next {
        let limits = self.policy.limits;
        let mut r = Deadline {
            s,
            until: Instant::now() + limits.idle,
        };
        let req: Request = match protocol::read_header(&mut r) {
            Ok(req) => req,
            Err(ProtocolError::Io(e)) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    debug!("{caller:?} connection: {e}");
                }
                return Next::Close;
            }
            Err(e) => return Next::Fatal(Response::error(ErrorKind::BadRequest, format!("bad request: {e}"))),
        };
        let n = req.payload_len;
        let early = if n > MAX_PAYLOAD {
            Some(Response::error(
                ErrorKind::BadRequest,
                format!("bad request: {}", ProtocolError::PayloadTooLarge(n)),
            ))
        } else if n > 0 && req.op != Op::Apply {
            Some(Response::error(
                ErrorKind::BadRequest,
                format!("bad request: {:?} carries no payload", req.op),
            ))
        } else {
            self.forbidden(caller, &req.op)
                .map(|why| Response::error(ErrorKind::Refused, why))
        };
        if let Some(resp) = early {
            // Reply first (the sender reads it once it has written everything), then
            // drain what it sends, so that it does not see a broken pipe.
            return self.refuse(s, &resp, n);
        }
        // Payloads in flight share a budget: a request that would exceed it is refused.
        let budget = limits.payload_budget;
        if self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + n <= budget).then_some(b + n)
            })
            .is_err()
        {
            let resp = Response::error(ErrorKind::Failed, "server busy: too many patch uploads at once; retry");
            return self.refuse(s, &resp, n);
        }
        let _held = Reservation(&self.buffered, n);
        let mut payload = vec![0u8; n as usize];
        let mut r = Deadline {
            s,
            until: Instant::now() + limits.transfer,
        };
        if let Err(e) = r.read_exact(&mut payload) {
            debug!("{caller:?} connection: payload: {e}");
            return Next::Close;
        }
        Next::Request(req, payload)
    }

    /// Sends `resp` for a request refused before its `n`-byte payload, then drains that.
    fn refuse(&self, s: &mut UnixStream, resp: &Response, n: u64) -> Next {
        if protocol::write_frame(s, resp, &[]).is_err() || !self.drain(s, n) {
            return Next::Close;
        }
        Next::Replied
    }

    /// Serves requests from `caller` on a stream until the peer closes it, stays idle for
    /// [`Limits::idle`], or sends a malformed request.
    pub fn serve_stream(&self, mut s: UnixStream, caller: Caller) {
        let _ = s.set_write_timeout(Some(self.policy.limits.transfer));
        loop {
            let resp = match self.next_request(&mut s, caller) {
                Next::Request(req, payload) => {
                    debug!("request {:?} from {caller:?} ({} payload bytes)", req.op, payload.len());
                    let resp = self.handle(caller, &req, &payload);
                    drop(payload);
                    resp
                }
                Next::Replied => continue,
                Next::Close => return,
                Next::Fatal(resp) => {
                    let _ = protocol::write_frame(&mut s, &resp, &[]);
                    return;
                }
            };
            if protocol::write_frame(&mut s, &resp, &[]).is_err() {
                return;
            }
        }
    }

    /// Serves `s` from `caller` on a new thread if a slot is free on its channel; otherwise
    /// answers it with an error and closes it.
    pub fn spawn_connection(self: &Arc<Self>, mut s: UnixStream, caller: Caller) {
        let Some(slot) = self.admit(caller) else {
            let max = self.policy.limits.connections;
            warn!("{caller:?} channel: {max} connections already served; refusing one more");
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = protocol::write_frame(
                &mut s,
                &Response::error(
                    ErrorKind::Failed,
                    format!("server busy: {max} connections already open on this channel"),
                ),
                &[],
            );
            return;
        };
        let me = self.clone();
        let name = match caller {
            Caller::Host => "api-conn",
            Caller::Guest => "vsock-conn",
        };
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _slot = slot;
            me.serve_stream(s, caller)
        }) {
            warn!("cannot start a connection thread: {e}");
        }
    }

    /// Listens on the Unix API socket at `path` (see [`apisock::bind`]: a stale socket is
    /// replaced, anything else there is refused); serves the VMM's own user and root. The
    /// returned guard removes the socket when dropped, if the path still names it.
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> Result<ApiSocket, ApiSocketError> {
        let (listener, guard) = apisock::bind(path)?;
        let me = self.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("api-sock".into())
            .spawn(move || {
                info!("update server listening on {shown}");
                let me_uid = apisock::my_uid();
                apisock::accept_loop(
                    || Some(listener.accept().map(|(c, _)| c)),
                    |c| match apisock::peer_uid(&c) {
                        Ok(uid) if apisock::uid_allowed(uid, me_uid) => me.spawn_connection(c, Caller::Host),
                        Ok(uid) => {
                            warn!("api socket: refusing a client with uid {uid}");
                            let mut c = c;
                            let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
                            let _ = protocol::write_frame(
                                &mut c,
                                &Response::error(ErrorKind::Refused, format!("uid {uid} may not use this API socket")),
                                &[],
                            );
                        }
                        Err(e) => warn!("api socket: peer credentials: {e}"),
                    },
                );
            })
            .map_err(|source| ApiSocketError::Io {
                path: path.into(),
                what: "starting the accept thread",
                source,
            })?;
        Ok(guard)
    }

    /// Re-checks patches in transition every `period`.
    pub fn start_rechecks(self: &Arc<Self>, period: Duration) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("recheck".into()).spawn(move || loop {
            std::thread::sleep(period);
            let Some(me) = me.upgrade() else { return };
            let mut m = me.manager();
            m.check_all(me.guest.as_ref());
            m.prune(KEEP_ROLLED_BACK);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;
    use crate::guest::{CodeInfo, GuestError, PatchRegion, SymbolError, TableSizes, TaskState, VcpuState, WriteRule};
    use ed25519_dalek::SigningKey;
    use std::io::Write;

    /// A guest with nothing in it: enough for requests that never touch guest memory.
    struct NullGuest;

    impl Guest for NullGuest {
        fn symbol(&self, name: &str) -> Result<(u64, u64), SymbolError> {
            Err(SymbolError(format!("no symbol '{name}' in the null guest")))
        }
        fn link_symbol(&self, name: &str) -> Result<u64, SymbolError> {
            self.symbol(name).map(|(a, _)| a)
        }
        fn table_sizes(&self) -> Result<TableSizes, GuestError> {
            Err(GuestError::Refused("null guest".into()))
        }
        fn register_code(&self, _: u64, _: &CodeInfo) -> Result<(), GuestError> {
            Err(GuestError::Refused("null guest".into()))
        }
        fn unregister_code(&self, _: u64) -> Result<(), GuestError> {
            Ok(())
        }
        fn module(&self, _: &str) -> Result<crate::guest::ModuleRef, crate::guest::ModuleLookupError> {
            Err(crate::guest::ModuleLookupError::NotLoaded { loaded: "none".into() })
        }
        fn pin_module(&self, _: &crate::guest::ModuleRef) -> Result<(), GuestError> {
            Err(GuestError::Refused("null guest".into()))
        }
        fn unpin_module(&self, _: &crate::guest::ModuleRef) -> Result<(), GuestError> {
            Ok(())
        }
        fn describe(&self, a: u64) -> String {
            format!("{a:#x}")
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), GuestError> {
            Err(GuestError::Memory("null guest".into()))
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), GuestError> {
            Err(GuestError::Memory("null guest".into()))
        }
        fn stop_the_world(&self, f: &mut dyn FnMut(&[VcpuState])) -> Result<Duration, GuestError> {
            f(&[]);
            Ok(Duration::ZERO)
        }
        fn tasks(&self) -> Result<Vec<TaskState>, GuestError> {
            Ok(vec![])
        }
        fn patch_region(&self) -> PatchRegion {
            PatchRegion { va: 0, size: 0 }
        }
        fn protect(&self, _: u64, _: u64, _: &str, _: WriteRule) -> Result<(), GuestError> {
            Ok(())
        }
        fn unprotect(&self, _: &str) -> Result<(), GuestError> {
            Ok(())
        }
        fn call(&self, _: u64, _: [u64; 2], _: Duration) -> Result<u64, GuestError> {
            Ok(0)
        }
        fn readonly_pages(&self) -> u64 {
            0
        }
        fn cpu_caps(&self) -> Result<Vec<u32>, GuestError> {
            Ok(vec![])
        }
    }

    const KERNEL: [u8; 20] = [0x27; 20];

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn server(guest: GuestRights, limits: Limits) -> Arc<UpdateServer> {
        UpdateServer::new(
            Arc::new(NullGuest),
            Policy {
                trusted: vec![key().verifying_key()],
                kernel_id: KERNEL.to_vec(),
                guest,
                limits,
            },
        )
    }

    fn req(op: Op, id: Option<u32>, payload_len: u64) -> Request {
        Request { op, id, payload_len }
    }

    /// A connection from `caller` served by `s`; the client end.
    fn connect(s: &Arc<UpdateServer>, caller: Caller) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        s.spawn_connection(ours, caller);
        theirs
    }

    #[test]
    fn a_guest_may_never_roll_back_and_applies_only_when_allowed() {
        for rights in [GuestRights::ReadOnly, GuestRights::Apply] {
            let s = server(rights, Limits::default());
            let r = s.handle(Caller::Guest, &req(Op::Rollback, Some(1), 0), &[]);
            assert!(!r.ok && r.error.contains("only the host"), "{r:?}");
            assert_eq!(r.error_kind, Some(ErrorKind::Refused));
            assert!(s.handle(Caller::Guest, &req(Op::List, None, 0), &[]).ok);
            assert!(s.handle(Caller::Guest, &req(Op::Status, None, 0), &[]).ok);
            let r = s.handle(Caller::Guest, &req(Op::Apply, None, 3), b"abc");
            if rights == GuestRights::ReadOnly {
                assert!(r.error.contains("not allowed over vsock"), "{r:?}");
            } else {
                assert!(r.error.contains("not signed"), "reaches the signature check: {r:?}");
            }
            // The host may: the request reaches the manager (no such patch).
            let r = s.handle(Caller::Host, &req(Op::Rollback, Some(1), 0), &[]);
            assert_eq!(r.error_kind, Some(ErrorKind::NotFound), "{r:?}");
        }
        // Over a stream too, and the refused payload is drained: the connection goes on.
        let s = server(GuestRights::ReadOnly, Limits::default());
        let mut c = Client::from_stream(connect(&s, Caller::Guest));
        let r = c.request(Op::Apply, None, &[0u8; 100_000]).unwrap();
        assert!(r.error.contains("not allowed over vsock"), "{r:?}");
        assert!(c.request(Op::List, None, &[]).unwrap().ok);
    }

    #[test]
    fn modules_for_another_kernel_are_refused() {
        let s = server(GuestRights::Apply, Limits::default());
        let signed = signing::sign(
            b"module",
            &signing::Binding {
                kernel_id: vec![0x11; 20],
                version: 1,
            },
            &key(),
        )
        .unwrap();
        let r = s.handle(Caller::Host, &req(Op::Apply, None, 0), &signed);
        assert!(r.error.contains("signed for kernel build 1111"), "{r:?}");
        // An unbound (first-format) signature is refused too.
        let mut v1 = b"module".to_vec();
        v1.extend_from_slice(&[0; 120]);
        v1.extend_from_slice(b"~lucos-signed-1~");
        let r = s.handle(Caller::Host, &req(Op::Apply, None, 0), &v1);
        assert!(r.error.contains("old format"), "{r:?}");
    }

    #[test]
    fn replays_and_downgrades_are_refused() {
        let s = server(GuestRights::Apply, Limits::default());
        s.versions().highest.insert("fix".into(), 3);
        let m = s.manager();
        assert!(s
            .check_version(&m, Caller::Guest, "fix", 2)
            .unwrap_err()
            .contains("downgrade"));
        assert!(s
            .check_version(&m, Caller::Host, "fix", 2)
            .unwrap_err()
            .contains("downgrade"));
        // The highest version, no longer applied: a replay from the guest, a re-apply from
        // the host.
        assert!(s
            .check_version(&m, Caller::Guest, "fix", 3)
            .unwrap_err()
            .contains("replay"));
        assert!(s.check_version(&m, Caller::Host, "fix", 3).is_ok());
        assert!(s.check_version(&m, Caller::Guest, "fix", 4).is_ok());
        assert!(s.check_version(&m, Caller::Guest, "other", 1).is_ok());
    }

    #[test]
    fn connections_per_channel_are_capped() {
        let limits = Limits {
            connections: 2,
            ..Limits::default()
        };
        let s = server(GuestRights::ReadOnly, limits);
        let mut held: Vec<UnixStream> = (0..2).map(|_| connect(&s, Caller::Guest)).collect();
        let mut extra = connect(&s, Caller::Guest);
        let r: Response = protocol::read_header(&mut extra).unwrap();
        assert!(r.error.contains("server busy: 2 connections"), "{r:?}");
        // The host channel has its own slots.
        let mut c = Client::from_stream(connect(&s, Caller::Host));
        assert!(c.request(Op::List, None, &[]).unwrap().ok);
        // A slot is given back when its connection ends.
        drop(held.pop());
        std::thread::sleep(Duration::from_millis(200));
        let mut c = Client::from_stream(connect(&s, Caller::Guest));
        assert!(c.request(Op::List, None, &[]).unwrap().ok);
    }

    #[test]
    fn idle_and_slow_connections_time_out() {
        let limits = Limits {
            idle: Duration::from_millis(200),
            transfer: Duration::from_millis(200),
            ..Limits::default()
        };
        let s = server(GuestRights::Apply, limits);
        let mut idle = connect(&s, Caller::Guest);
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(idle.read(&mut b).unwrap(), 0, "closed by the server");
        // A payload announced but never sent.
        let mut slow = connect(&s, Caller::Guest);
        protocol::write_frame(&mut slow, &req(Op::Apply, None, 1000), b"12").unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(slow.read(&mut b).unwrap(), 0, "closed by the server");
        assert_eq!(s.buffered.load(Ordering::Acquire), 0, "budget given back");
        let t0 = Instant::now();
        while s.active[Caller::Guest as usize].load(Ordering::Acquire) != 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            s.active[Caller::Guest as usize].load(Ordering::Acquire),
            0,
            "slots given back"
        );
    }

    #[test]
    fn payloads_share_a_memory_budget() {
        let limits = Limits {
            payload_budget: 1000,
            ..Limits::default()
        };
        let s = server(GuestRights::Apply, limits);
        // One upload holds 800 bytes of the budget (announced, 2 bytes sent so far).
        let mut first = connect(&s, Caller::Guest);
        protocol::write_frame(&mut first, &req(Op::Apply, None, 800), b"12").unwrap();
        let t0 = Instant::now();
        while s.buffered.load(Ordering::Acquire) != 800 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = Client::from_stream(connect(&s, Caller::Host));
        let r = c.request(Op::Apply, None, &[0u8; 300]).unwrap();
        assert!(r.error.contains("server busy"), "{r:?}");
        assert!(c.request(Op::List, None, &[]).unwrap().ok, "the connection goes on");
        first.write_all(&[0u8; 798]).unwrap();
        let r: Response = protocol::read_header(&mut first).unwrap();
        assert!(r.error.contains("not signed"), "{r:?}");
        assert_eq!(s.buffered.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_oversized_apply_gets_the_size_error_not_a_broken_pipe() {
        let s = server(GuestRights::Apply, Limits::default());
        // The client checks the size itself.
        let mut c = Client::from_stream(connect(&s, Caller::Host));
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        let e = c.request(Op::Apply, None, &big).unwrap_err();
        assert!(e.to_string().contains("more than the 16777216 bytes"), "{e}");
        // A client that sends it anyway reads the server's reply after writing it all.
        let mut raw = connect(&s, Caller::Host);
        protocol::write_frame(&mut raw, &req(Op::Apply, None, big.len() as u64), &big).unwrap();
        let r: Response = protocol::read_header(&mut raw).unwrap();
        assert!(r.error.contains("exceeds the 16777216-byte limit"), "{r:?}");
        // And the connection still serves.
        protocol::write_frame(&mut raw, &req(Op::List, None, 0), &[]).unwrap();
        let r: Response = protocol::read_header(&mut raw).unwrap();
        assert!(r.ok, "{r:?}");
    }

    /// The memory (kB) and threads of this process, from /proc/self/status.
    fn rss_threads() -> (u64, u64) {
        let st = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            st.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("Threads:"))
    }

    /// The flood, measured: 48 clients each start a 16 MiB apply and stall before
    /// its last byte. Run alone (other tests would share the process's memory):
    /// `cargo test -p lucos-update-server --lib flood -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn flood_of_stalled_uploads_is_bounded() {
        let s = server(GuestRights::Apply, Limits::default());
        let (rss0, threads0) = rss_threads();
        let chunk = vec![0u8; MAX_PAYLOAD as usize - 1];
        let clients: Vec<_> = (0..48)
            .map(|_| {
                let mut c = connect(&s, Caller::Host);
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    let _ = protocol::write_frame(&mut c, &req(Op::Apply, None, MAX_PAYLOAD), &chunk);
                    c
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(3));
        let (rss1, threads1) = rss_threads();
        // What the clients themselves hold (48 copies of the chunk, their threads) is
        // not the server's: count the server's threads and buffered bytes.
        let buffered = s.buffered.load(Ordering::Acquire);
        let serving = s.active[Caller::Host as usize].load(Ordering::Acquire);
        eprintln!(
            "48 stalled 16 MiB uploads: server threads {serving}, payload bytes buffered {buffered} \
             ({} MiB); process RSS +{} MiB (clients' own buffers included), threads {threads0} -> {threads1}",
            buffered >> 20,
            (rss1.saturating_sub(rss0)) >> 10
        );
        assert!(serving <= 8 && buffered <= 2 * MAX_PAYLOAD);
        drop(clients);
    }

    fn info(id: u32, state: PatchState) -> PatchInfo {
        PatchInfo {
            id,
            name: format!("patch-with-a-rather-long-name-{id}"),
            description: "x".repeat(300),
            state,
            functions: vec![],
            data: vec![],
            image_addr: 0,
            image_size: 0,
            pause_us: 0,
            apply_us: 0,
            applied_at: 0,
            checks: 0,
            blockers: vec![],
            callbacks: vec![],
            callback_log: vec!["a callback ran".repeat(10); 5],
            modules: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn replies_never_exceed_the_header_limit() {
        let patches: Vec<PatchInfo> = (1..=400)
            .map(|i| {
                info(
                    i,
                    if i % 2 == 0 {
                        PatchState::RolledBack
                    } else {
                        PatchState::Committed
                    },
                )
            })
            .collect();
        let r = fit_reply(Response {
            ok: true,
            patches,
            ..Default::default()
        });
        assert!(serde_json::to_vec(&r).unwrap().len() <= MAX_HEADER as usize);
        assert!(r.message.contains("patches left out"), "{}", r.message);
        // Rolled-back records go first.
        assert!(r.patches.iter().all(|p| p.state == PatchState::Committed));
        // One patch with a huge log is cut down too.
        let mut one = info(1, PatchState::Committed);
        one.callback_log = vec!["line".repeat(50); 2000];
        let r = fit_reply(Response {
            ok: true,
            patches: vec![one],
            ..Default::default()
        });
        assert!(serde_json::to_vec(&r).unwrap().len() <= MAX_HEADER as usize);
        assert!(!r.patches[0].callback_log.is_empty(), "the newest lines are kept");
        let mut buf = Vec::new();
        protocol::write_frame(&mut buf, &r, &[]).unwrap();
        let back: Response = protocol::read_header(&mut &buf[..]).unwrap();
        assert_eq!(back, r, "a client reads it");
    }
}
