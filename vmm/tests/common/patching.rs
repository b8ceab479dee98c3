//! A guest booted ready to be patched: a fresh key pair it trusts, the update API on a Unix
//! socket, the serial console as a [`Session`]. A patch test is then: boot, observe, apply,
//! observe, roll back, observe.

#![allow(dead_code)]

use std::path::PathBuf;

use lucos_update_server::protocol::{Op, PatchInfo, PatchState, Response};

use super::api::{call, wait_state, Keys};
use super::session::{build_patch, tempdir, Session};

/// A booted guest, its keys and its API socket.
pub struct PatchedGuest {
    /// The guest's console.
    pub session: Session,
    /// The key pair the VMM trusts.
    pub keys: Keys,
    /// The update API socket.
    pub sock: PathBuf,
    /// A scratch folder for this test.
    pub dir: PathBuf,
}

impl PatchedGuest {
    /// Boots a guest with `vcpus` vCPUs serving the update API; `tag` names the scratch
    /// folder; `extra` are more `lucos-vmm run` arguments.
    pub fn boot(tag: &str, vcpus: u8, extra: &[&str]) -> Self {
        let dir = tempdir(tag);
        let keys = Keys::new(&dir);
        let sock = dir.join("api.sock");
        let mut args: Vec<&str> = keys.vmm_args(&sock).to_vec();
        args.extend_from_slice(extra);
        let session = Session::boot(vcpus, &args);
        PatchedGuest {
            session,
            keys,
            sock,
            dir,
        }
    }

    /// The patch module `rel` (e.g. "cmdline/lucos_cmdline.ko"), built and signed.
    pub fn signed(&self, rel: &str) -> Vec<u8> {
        self.keys
            .sign(&std::fs::read(build_patch(rel)).expect("read the patch module"))
    }

    /// One API request.
    pub fn call(&self, op: Op, id: Option<u32>, payload: &[u8]) -> Response {
        call(&self.sock, op, id, payload)
    }

    /// Submits `module`; asserts the server accepted it; returns the patch id.
    pub fn apply(&self, module: &[u8]) -> u32 {
        let r = self.call(Op::Apply, None, module);
        assert!(r.ok, "apply: {r:?}");
        eprintln!("apply: {}", r.message);
        r.patches[0].id
    }

    /// Submits `module` and waits for it to commit; returns the patch id.
    pub fn apply_committed(&self, module: &[u8]) -> u32 {
        let id = self.apply(module);
        self.wait(id, PatchState::Committed);
        id
    }

    /// Rolls patch `id` back and waits until its code is gone.
    pub fn rollback(&self, id: u32) {
        let r = self.call(Op::Rollback, Some(id), &[]);
        assert!(r.ok, "rollback {id}: {r:?}");
        self.wait(id, PatchState::RolledBack);
    }

    /// Polls the status of patch `id` until it is in state `want`.
    pub fn wait(&self, id: u32, want: PatchState) -> PatchInfo {
        wait_state(&self.sock, id, want)
    }

    /// Reboots the guest; asserts lucos-vmm exited cleanly.
    pub fn shutdown(self) {
        assert_eq!(self.session.shutdown(), Some(0));
    }
}
