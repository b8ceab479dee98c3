//! lucos's update API from the bench: a signing key the VMM trusts, and apply / rollback
//! over the VMM's Unix API socket, timed from the host (the wire protocol and signing come
//! from `lucos_update_server`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lucos_update_server::client::{Client, Target};
use lucos_update_server::protocol::{Op, PatchInfo, PatchState, Response};
use lucos_update_server::signing;

/// The update API of one VMM, with the key pair it trusts.
pub struct Api {
    /// The API socket.
    pub sock: PathBuf,
    /// The public key the VMM trusts.
    pub public_key: PathBuf,
    secret_key: PathBuf,
    /// The guest kernel's build id, which signatures bind.
    kernel_id: Vec<u8>,
    /// How often the patch's state is polled.
    pub poll: Duration,
}

/// One apply or rollback as the host saw it.
#[derive(Debug, Clone)]
pub struct Timed {
    /// The patch.
    pub id: u32,
    /// From sending the request to its answer (the jumps are in, or out).
    pub call: Duration,
    /// From sending the request to the state `committed` (or `rolled-back`).
    pub done: Duration,
    /// apply: vCPUs paused by the VMM while it wrote the jumps (from `status`).
    pub pause_us: Option<u64>,
}

impl Api {
    /// A fresh key pair in `dir`, signing for the kernel `vmlinux`; the API socket will be
    /// `dir/api.sock`.
    pub fn new(dir: &Path, vmlinux: &Path) -> Result<Api, String> {
        let kernel_id = signing::kernel_id_of(vmlinux).map_err(|e| e.to_string())?;
        let (sk, pk) = signing::generate_keypair().map_err(|e| format!("key generation: {e}"))?;
        let (secret_key, public_key) = (dir.join("bench.key"), dir.join("bench.pub"));
        std::fs::write(&secret_key, sk).map_err(|e| format!("{}: {e}", secret_key.display()))?;
        std::fs::write(&public_key, pk).map_err(|e| format!("{}: {e}", public_key.display()))?;
        Ok(Api {
            sock: dir.join("api.sock"),
            public_key,
            secret_key,
            kernel_id,
            poll: Duration::from_millis(5),
        })
    }

    /// The key pair in `dir` if there is one (made by an earlier [`Api::with_keys`]), else
    /// a fresh one; the API socket will be `dir/api.sock`.
    pub fn with_keys(dir: &Path, vmlinux: &Path) -> Result<Api, String> {
        let (secret_key, public_key) = (dir.join("bench.key"), dir.join("bench.pub"));
        if !(secret_key.exists() && public_key.exists()) {
            return Self::new(dir, vmlinux);
        }
        Ok(Api {
            sock: dir.join("api.sock"),
            public_key,
            secret_key,
            kernel_id: signing::kernel_id_of(vmlinux).map_err(|e| e.to_string())?,
            poll: Duration::from_millis(5),
        })
    }

    /// The patch module at `ko`, signed with the key the VMM trusts as `version`.
    pub fn signed(&self, ko: &Path, version: u64) -> Result<Vec<u8>, String> {
        let module = std::fs::read(ko).map_err(|e| format!("{}: {e} (run images/build.sh)", ko.display()))?;
        let key = signing::load_signing_key(&self.secret_key).map_err(|e| format!("signing key: {e}"))?;
        let binding = signing::Binding {
            kernel_id: self.kernel_id.clone(),
            version,
        };
        signing::sign(&module, &binding, &key).map_err(|e| format!("signing: {e}"))
    }

    /// The secret key the VMM's trusted key belongs to (for `lucos-build --key`).
    pub fn secret_key(&self) -> &Path {
        &self.secret_key
    }

    /// `lucos-vmm run` arguments that serve the API and trust the key.
    pub fn vmm_args(&self) -> Vec<String> {
        vec![
            "--api-sock".into(),
            self.sock.display().to_string(),
            "--trusted-key".into(),
            self.public_key.display().to_string(),
        ]
    }

    fn client(&self) -> Result<Client, String> {
        // A stuck server fails the run instead of hanging it.
        Client::connect_timeout(&Target::Unix(self.sock.clone()), std::time::Duration::from_secs(300))
            .map_err(|e| format!("lucos API: {e}"))
    }

    fn first(r: Response) -> Result<PatchInfo, String> {
        r.patches
            .into_iter()
            .next()
            .ok_or_else(|| "API answer names no patch".to_string())
    }

    /// Polls `id` until its state is `want`.
    fn wait(&self, id: u32, want: PatchState, timeout: Duration) -> Result<PatchInfo, String> {
        self.client()?
            .wait_state(id, want, timeout, self.poll)
            .map_err(|e| format!("lucos: {e}"))
    }

    /// Submits a signed module and waits until it is committed.
    pub fn apply(&self, signed: &[u8], timeout: Duration) -> Result<Timed, String> {
        let start = Instant::now();
        let p = Self::first(
            self.client()?
                .call(Op::Apply, None, signed)
                .map_err(|e| format!("lucos apply: {e}"))?,
        )?;
        let call = start.elapsed();
        let p = self.wait(p.id, PatchState::Committed, timeout)?;
        Ok(Timed {
            id: p.id,
            call,
            done: start.elapsed(),
            pause_us: Some(p.pause_us),
        })
    }

    /// Rolls patch `id` back and waits until its memory is freed (`rolled-back`).
    pub fn rollback(&self, id: u32, timeout: Duration) -> Result<Timed, String> {
        let start = Instant::now();
        self.client()?
            .call(Op::Rollback, Some(id), &[])
            .map_err(|e| format!("lucos rollback: {e}"))?;
        let call = start.elapsed();
        self.wait(id, PatchState::RolledBack, timeout)?;
        Ok(Timed {
            id,
            call,
            done: start.elapsed(),
            pause_us: None,
        })
    }
}
