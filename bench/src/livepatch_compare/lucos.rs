//! lucos's update API from the bench: a signing key the VMM trusts, and apply / rollback
//! over the VMM's Unix API socket, timed from the host (the wire protocol and signing come
//! from `lucos_update_server`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lucos_update_server::protocol::{self, Op, PatchInfo, Request, Response};
use lucos_update_server::signing;

pub struct Api {
    pub sock: PathBuf,
    pub public_key: PathBuf,
    secret_key: PathBuf,
    /// How often the patch's state is polled.
    pub poll: Duration,
}

/// One apply or rollback as the host saw it.
#[derive(Debug, Clone)]
pub struct Timed {
    pub id: u32,
    /// From sending the request to its answer (the jumps are in, or out).
    pub call: Duration,
    /// From sending the request to the state `committed` (or `rolled-back`).
    pub done: Duration,
    /// apply: vCPUs paused by the VMM while it wrote the jumps (from `status`).
    pub pause_us: Option<u64>,
}

impl Api {
    /// A fresh key pair in `dir`; the API socket will be `dir/api.sock`.
    pub fn new(dir: &Path) -> Result<Api, String> {
        let (sk, pk) = signing::generate_keypair().map_err(|e| format!("key generation: {e}"))?;
        let (secret_key, public_key) = (dir.join("bench.key"), dir.join("bench.pub"));
        std::fs::write(&secret_key, sk).map_err(|e| format!("{}: {e}", secret_key.display()))?;
        std::fs::write(&public_key, pk).map_err(|e| format!("{}: {e}", public_key.display()))?;
        Ok(Api {
            sock: dir.join("api.sock"),
            public_key,
            secret_key,
            poll: Duration::from_millis(5),
        })
    }

    /// The patch module at `ko`, signed with the key the VMM trusts.
    pub fn signed(&self, ko: &Path) -> Result<Vec<u8>, String> {
        let module = std::fs::read(ko).map_err(|e| format!("{}: {e} (run images/build.sh)", ko.display()))?;
        let key = signing::load_signing_key(&self.secret_key).map_err(|e| format!("signing key: {e}"))?;
        Ok(signing::sign(&module, &key))
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

    fn call(&self, op: Op, id: Option<u32>, payload: &[u8]) -> Result<Response, String> {
        let mut s = UnixStream::connect(&self.sock).map_err(|e| format!("API socket {}: {e}", self.sock.display()))?;
        let req = Request {
            op: op.clone(),
            id,
            payload_len: payload.len() as u64,
        };
        protocol::write_frame(&mut s, &req, payload).map_err(|e| format!("API {op:?}: {e}"))?;
        let r: Response = protocol::read_header(&mut s).map_err(|e| format!("API {op:?}: {e}"))?;
        if !r.ok {
            return Err(format!("lucos {op:?} failed: {}", r.error));
        }
        Ok(r)
    }

    fn first(r: Response) -> Result<PatchInfo, String> {
        r.patches
            .into_iter()
            .next()
            .ok_or_else(|| "API answer names no patch".to_string())
    }

    /// Polls `id` until its state is `want`.
    fn wait(&self, id: u32, want: &str, timeout: Duration) -> Result<PatchInfo, String> {
        let start = Instant::now();
        loop {
            let p = Self::first(self.call(Op::Status, Some(id), &[])?)?;
            if p.state == want {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                return Err(format!("lucos patch {id} not {want} after {timeout:?}: {}", p.details));
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Submits a signed module and waits until it is committed.
    pub fn apply(&self, signed: &[u8], timeout: Duration) -> Result<Timed, String> {
        let start = Instant::now();
        let p = Self::first(self.call(Op::Apply, None, signed)?)?;
        let call = start.elapsed();
        let p = self.wait(p.id, "committed", timeout)?;
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
        self.call(Op::Rollback, Some(id), &[])?;
        let call = start.elapsed();
        self.wait(id, "rolled-back", timeout)?;
        Ok(Timed {
            id,
            call,
            done: start.elapsed(),
            pause_us: None,
        })
    }
}
