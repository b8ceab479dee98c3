//! The update API from a test: signing keys, requests over the Unix socket, waiting for states.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lucos_update_server::protocol::{self, Op, Request, Response};
use lucos_update_server::signing;

/// A fresh ed25519 key pair written to `dir` (k.key, k.pub).
pub struct Keys {
    pub public: PathBuf,
    key: ed25519_dalek::SigningKey,
}

impl Keys {
    pub fn new(dir: &Path) -> Keys {
        let (sk_hex, pk_hex) = signing::generate_keypair().unwrap();
        std::fs::write(dir.join("k.key"), &sk_hex).unwrap();
        std::fs::write(dir.join("k.pub"), &pk_hex).unwrap();
        Keys {
            public: dir.join("k.pub"),
            key: signing::load_signing_key(&dir.join("k.key")).unwrap(),
        }
    }

    pub fn sign(&self, module: &[u8]) -> Vec<u8> {
        signing::sign(module, &self.key)
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

/// One request on the API socket.
pub fn call(sock: &Path, op: Op, id: Option<u32>, payload: &[u8]) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect API socket");
    let req = Request {
        op,
        id,
        payload_len: payload.len() as u64,
    };
    protocol::write_frame(&mut s, &req, payload).unwrap();
    protocol::read_header(&mut s).unwrap()
}

/// Polls `status id` until the patch is in state `want`.
pub fn wait_state(sock: &Path, id: u32, want: &str) -> Response {
    let start = Instant::now();
    loop {
        let r = call(sock, Op::Status, Some(id), &[]);
        assert!(r.ok, "{r:?}");
        if r.patches[0].state == want {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "patch {id} never became {want}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
