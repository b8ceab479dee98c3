//! The update API from a test: signing keys, requests over the Unix socket, waiting for states.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lucos_update_server::client::{Client, Target};
use lucos_update_server::protocol::{Op, PatchInfo, PatchState, Response};
use lucos_update_server::signing;

/// A fresh ed25519 key pair written to `dir` (k.key, k.pub), signing for the test kernel.
pub struct Keys {
    pub public: PathBuf,
    key: ed25519_dalek::SigningKey,
    /// The test vmlinux's build id, which signatures bind.
    pub kernel_id: Vec<u8>,
    /// The last version [`Keys::sign`] used.
    version: AtomicU64,
}

impl Keys {
    pub fn new(dir: &Path) -> Keys {
        let (sk_hex, pk_hex) = signing::generate_keypair().unwrap();
        std::fs::write(dir.join("k.key"), &sk_hex).unwrap();
        std::fs::write(dir.join("k.pub"), &pk_hex).unwrap();
        Keys {
            public: dir.join("k.pub"),
            key: signing::load_signing_key(&dir.join("k.key")).unwrap(),
            kernel_id: signing::kernel_id_of(&super::images().0).expect("test vmlinux build id"),
            version: AtomicU64::new(0),
        }
    }

    /// `module` signed for the test kernel, with a version higher than every earlier one.
    pub fn sign(&self, module: &[u8]) -> Vec<u8> {
        let v = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        self.sign_version(module, v)
    }

    /// `module` signed for the test kernel as version `version`.
    pub fn sign_version(&self, module: &[u8], version: u64) -> Vec<u8> {
        self.sign_for(module, &self.kernel_id, version)
    }

    /// `module` signed for the kernel `kernel_id` as version `version`.
    pub fn sign_for(&self, module: &[u8], kernel_id: &[u8], version: u64) -> Vec<u8> {
        let binding = signing::Binding {
            kernel_id: kernel_id.to_vec(),
            version,
        };
        signing::sign(module, &binding, &self.key).expect("sign")
    }

    /// `lucos-vmm run` arguments serving the API on `sock` and trusting this key.
    pub fn vmm_args<'a>(&'a self, sock: &'a Path) -> [&'a str; 4] {
        [
            "--api-sock",
            sock.to_str().unwrap(),
            "--trusted-key",
            self.public.to_str().unwrap(),
        ]
    }
}

/// How long one API request may take to be answered: a stuck server fails the test
/// (naming the request) instead of hanging it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

fn connect(sock: &Path) -> Client {
    Client::connect_timeout(&Target::Unix(sock.into()), REPLY_TIMEOUT).expect("connect API socket")
}

/// One request on the API socket; the reply, success or not.
pub fn call(sock: &Path, op: Op, id: Option<u32>, payload: &[u8]) -> Response {
    connect(sock)
        .request(op.clone(), id, payload)
        .unwrap_or_else(|e| panic!("API request {op:?} (patch {id:?}): {e}"))
}

/// Polls `status id` until the patch is in state `want` (at most 300 s).
pub fn wait_state(sock: &Path, id: u32, want: PatchState) -> PatchInfo {
    connect(sock)
        .wait_state(id, want, Duration::from_secs(300), Duration::from_millis(100))
        .unwrap_or_else(|e| panic!("patch {id} never became {want}: {e}"))
}
