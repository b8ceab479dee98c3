//! Module signatures: ed25519 over the module bytes and its *binding* (the kernel build
//! it is for and its version), appended as a trailer so a signed module is one file:
//!
//! ```text
//! [module][binding: 41][signature: 64][public key: 32][module length: u64 LE][magic "~lucos-signed-2~"]
//! binding = kernel id length: u8 | kernel id: 32 bytes, zero-padded | version: u64 LE
//! ```
//!
//! The signature covers a domain tag, the module and the binding, so a module signed for
//! one kernel build cannot be submitted to another, and the server can refuse a replayed
//! or older version (see `service`). The kernel id is the vmlinux's GNU build-id note
//! ([`kernel_id`]). Modules in the first format (`~lucos-signed-1~`, no binding) are refused.
//!
//! Keys are stored as hex text: a private key file holds the 32-byte seed, a public key
//! file the 32-byte key.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use object::{Object, ObjectSymbol};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Last 16 bytes of a signed module: marks the signature trailer (and its version).
pub const MAGIC: &[u8; 16] = b"~lucos-signed-2~";
/// The magic of the first, unbound format, recognized only to refuse it clearly.
const MAGIC_V1: &[u8; 16] = b"~lucos-signed-1~";
/// What the signature covers in front of the module (domain separation from format 1).
const DOMAIN: &[u8] = b"lucos-signed-2\0";
/// Longest kernel id a binding holds.
pub const KERNEL_ID_MAX: usize = 32;
const BINDING: usize = 1 + KERNEL_ID_MAX + 8;
const TRAILER: usize = BINDING + 64 + 32 + 8 + 16;

/// What a signature binds a module to: the kernel build it was built for and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The kernel's id ([`kernel_id`]), at most [`KERNEL_ID_MAX`] bytes.
    pub kernel_id: Vec<u8>,
    /// The module's version: per patch name, the server only accepts a newer one.
    pub version: u64,
}

impl Binding {
    fn encode(&self) -> [u8; BINDING] {
        let mut b = [0u8; BINDING];
        let n = self.kernel_id.len().min(KERNEL_ID_MAX);
        b[0] = n as u8;
        b[1..1 + n].copy_from_slice(&self.kernel_id[..n]);
        b[1 + KERNEL_ID_MAX..].copy_from_slice(&self.version.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let n = b[0] as usize;
        if n > KERNEL_ID_MAX || b[1 + n..1 + KERNEL_ID_MAX].iter().any(|&x| x != 0) {
            return None;
        }
        Some(Binding {
            kernel_id: b[1..1 + n].to_vec(),
            version: u64::from_le_bytes(b[1 + KERNEL_ID_MAX..].try_into().ok()?),
        })
    }
}

/// A module whose signature verified, with what it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    /// The module bytes.
    pub module: &'a [u8],
    /// The trusted key that signed it.
    pub key: VerifyingKey,
    /// The kernel build and version the signature covers.
    pub binding: Binding,
}

/// Why a signed module or a key file is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignError {
    /// The data is shorter than a trailer or does not end with [`MAGIC`].
    #[error("module is not signed (no lucos signature trailer): sign it with `lucosctl sign`")]
    NotSigned,
    /// The module is signed in the first format, which binds it to no kernel and no version.
    #[error(
        "module is signed in the old format, bound to no kernel build or version: \
         re-sign it with `lucosctl sign --kernel VMLINUX --version N`"
    )]
    Unbound,
    /// The trailer's binding is malformed.
    #[error("signed module has a malformed kernel/version binding")]
    BadBinding,
    /// The trailer's module length does not match the bytes in front of the trailer.
    #[error("signed module is truncated or malformed: trailer says {claimed} module bytes, file has {actual}")]
    Truncated {
        /// Module length the trailer records.
        claimed: u64,
        /// Bytes actually in front of the trailer.
        actual: u64,
    },
    /// The signer's key is not a trusted one; the string is its fingerprint.
    #[error("module is signed by key {0}, which this VMM does not trust (see --trusted-key)")]
    UntrustedKey(String),
    /// The signature does not verify against the module bytes.
    #[error("signature does not verify: the module was modified or signed with another key")]
    BadSignature,
    /// The kernel id for a binding cannot be taken from a vmlinux.
    #[error("kernel '{path}': {what}")]
    Kernel {
        /// The vmlinux path (or a description of the bytes).
        path: String,
        /// What is wrong with it.
        what: String,
    },
    /// A key file cannot be read, is not hex, does not hold 32 bytes, or is not a valid ed25519
    /// public key.
    #[error("key file '{path}': {what}")]
    KeyFile {
        /// The key file's path.
        path: String,
        /// What is wrong with it.
        what: String,
    },
}

/// Short fingerprint of a public key (first 8 bytes, hex).
pub fn fingerprint(key: &VerifyingKey) -> String {
    hex(&key.to_bytes()[..8])
}

/// Lower-case hex of `b`, two digits per byte (the key file format).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn read_key32(path: &Path) -> Result<[u8; 32], SignError> {
    let err = |what: String| SignError::KeyFile {
        path: path.display().to_string(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let bytes = unhex(&text).ok_or_else(|| err("not hex".into()))?;
    bytes
        .try_into()
        .map_err(|_| err("expected 32 bytes (64 hex digits)".into()))
}

/// Reads a private key file: the 32-byte ed25519 seed in hex.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, SignError> {
    Ok(SigningKey::from_bytes(&read_key32(path)?))
}

/// Reads a public key file: the 32-byte ed25519 public key in hex.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, SignError> {
    VerifyingKey::from_bytes(&read_key32(path)?).map_err(|e| SignError::KeyFile {
        path: path.display().to_string(),
        what: format!("invalid ed25519 public key: {e}"),
    })
}

/// Writes `text` and a newline to a new key file at `path` with `mode` from its creation
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`): an existing file or symlink there is an error unless
/// `force`, which removes it first (a symlink itself, never its target).
pub fn write_key_file(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), SignError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |what: String| SignError::KeyFile {
        path: path.display().to_string(),
        what,
    };
    if force {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("cannot replace it: {e}"))),
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => err("exists; not overwriting it (use --force)".into()),
            _ => err(e.to_string()),
        })?;
    // The mode given at creation is reduced by the umask, never widened: set it exactly.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("setting mode {mode:o}: {e}")))?;
    f.write_all(format!("{text}\n").as_bytes())
        .map_err(|e| err(e.to_string()))
}

/// A new key pair from the OS's random source: (private seed hex, public key hex).
pub fn generate_keypair() -> std::io::Result<(String, String)> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let sk = SigningKey::from_bytes(&seed);
    Ok((hex(&seed), hex(&sk.verifying_key().to_bytes())))
}

/// The id of a kernel build, to bind signatures to: the payload of the vmlinux's GNU
/// build-id note, or, for a vmlinux without one, the SHA-256 of its `linux_banner` (the
/// version string with the build's compiler, date and counter). `elf` is the vmlinux.
pub fn kernel_id(elf: &[u8]) -> Result<Vec<u8>, SignError> {
    let err = |what: String| SignError::Kernel {
        path: "vmlinux".into(),
        what,
    };
    let file = object::File::parse(elf).map_err(|e| err(format!("not an ELF file: {e}")))?;
    if let Ok(Some(id)) = file.build_id() {
        if !id.is_empty() && id.len() <= KERNEL_ID_MAX {
            return Ok(id.to_vec());
        }
    }
    let banner = file
        .symbols()
        .find(|s| s.name() == Ok("linux_banner"))
        .ok_or_else(|| err("no GNU build-id note and no linux_banner symbol".into()))?;
    let section = banner
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| err("linux_banner is in no section".into()))?;
    use object::ObjectSection;
    let data = section
        .data_range(banner.address(), banner.size().max(1))
        .ok()
        .flatten()
        .ok_or_else(|| err("linux_banner has no data in the file".into()))?;
    let text = data.split(|&b| b == 0).next().unwrap_or_default();
    Ok(Sha256::digest(text).to_vec())
}

/// [`kernel_id`] of the vmlinux at `path`.
pub fn kernel_id_of(path: &Path) -> Result<Vec<u8>, SignError> {
    let bytes = std::fs::read(path).map_err(|e| SignError::Kernel {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    kernel_id(&bytes).map_err(|e| match e {
        SignError::Kernel { what, .. } => SignError::Kernel {
            path: path.display().to_string(),
            what,
        },
        e => e,
    })
}

fn signed_message(module: &[u8], binding: &[u8; BINDING]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + module.len() + BINDING);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(module);
    m.extend_from_slice(binding);
    m
}

/// Appends a signature trailer to `module`, binding it to `binding`'s kernel and version.
/// A kernel id longer than [`KERNEL_ID_MAX`] is refused.
pub fn sign(module: &[u8], binding: &Binding, key: &SigningKey) -> Result<Vec<u8>, SignError> {
    if binding.kernel_id.is_empty() || binding.kernel_id.len() > KERNEL_ID_MAX {
        return Err(SignError::BadBinding);
    }
    let b = binding.encode();
    let sig = key.sign(&signed_message(module, &b));
    let mut out = Vec::with_capacity(module.len() + TRAILER);
    out.extend_from_slice(module);
    out.extend_from_slice(&b);
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(&key.verifying_key().to_bytes());
    out.extend_from_slice(&(module.len() as u64).to_le_bytes());
    out.extend_from_slice(MAGIC);
    Ok(out)
}

/// Whether `data` ends with a signature trailer of either format.
pub fn is_signed(data: &[u8]) -> bool {
    data.ends_with(MAGIC) || data.ends_with(MAGIC_V1)
}

/// Checks the trailer against the trusted keys; returns the module bytes, the signer and
/// the binding (which the caller checks against the running kernel and its versions).
pub fn verify<'a>(signed: &'a [u8], trusted: &[VerifyingKey]) -> Result<Verified<'a>, SignError> {
    if signed.ends_with(MAGIC_V1) {
        return Err(SignError::Unbound);
    }
    if signed.len() < TRAILER || &signed[signed.len() - 16..] != MAGIC {
        return Err(SignError::NotSigned);
    }
    let t = signed.len() - TRAILER;
    let tail = &signed[t..];
    let claimed = u64::from_le_bytes(tail[BINDING + 96..BINDING + 104].try_into().expect("8 bytes"));
    if claimed != t as u64 {
        return Err(SignError::Truncated {
            claimed,
            actual: t as u64,
        });
    }
    let module = &signed[..t];
    let b: [u8; BINDING] = tail[..BINDING].try_into().expect("binding bytes");
    let sig = Signature::from_bytes(tail[BINDING..BINDING + 64].try_into().expect("64 bytes"));
    let key_bytes: [u8; 32] = tail[BINDING + 64..BINDING + 96].try_into().expect("32 bytes");
    let key = trusted
        .iter()
        .find(|k| k.to_bytes() == key_bytes)
        .copied()
        .ok_or_else(|| SignError::UntrustedKey(hex(&key_bytes[..8])))?;
    key.verify(&signed_message(module, &b), &sig)
        .map_err(|_| SignError::BadSignature)?;
    let binding = Binding::decode(&b).ok_or(SignError::BadBinding)?;
    Ok(Verified { module, key, binding })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn bind(v: u64) -> Binding {
        Binding {
            kernel_id: vec![0xab; 20],
            version: v,
        }
    }

    fn sign(m: &[u8], k: &SigningKey) -> Vec<u8> {
        super::sign(m, &bind(3), k).unwrap()
    }

    #[test]
    fn sign_and_verify() {
        let k = key(7);
        let signed = sign(b"module bytes", &k);
        let v = verify(&signed, &[key(1).verifying_key(), k.verifying_key()]).unwrap();
        assert_eq!(v.module, b"module bytes");
        assert_eq!(v.key, k.verifying_key());
        assert_eq!(v.binding, bind(3));
    }

    #[test]
    fn binding_is_signed() {
        let k = key(7);
        let trusted = [k.verifying_key()];
        let signed = sign(b"module bytes", &k);
        let t = signed.len() - TRAILER;
        // Changing the kernel id or the version breaks the signature.
        for off in [1, 1 + KERNEL_ID_MAX] {
            let mut bad = signed.clone();
            bad[t + off] ^= 1;
            assert_eq!(verify(&bad, &trusted), Err(SignError::BadSignature), "offset {off}");
        }
        // A first-format module (no binding) is refused with advice.
        let mut v1 = b"module".to_vec();
        v1.extend_from_slice(&[0; 120]);
        v1.extend_from_slice(MAGIC_V1);
        assert_eq!(verify(&v1, &trusted), Err(SignError::Unbound));
        assert!(is_signed(&v1) && is_signed(&signed));
        // Kernel ids must fit.
        let long = Binding {
            kernel_id: vec![1; KERNEL_ID_MAX + 1],
            version: 1,
        };
        assert_eq!(super::sign(b"m", &long, &k), Err(SignError::BadBinding));
    }

    #[test]
    fn kernel_id_of_the_test_binary_and_garbage() {
        // The test binary is an ELF file with a GNU build-id note (Rust links with one by
        // default on Linux) or at least symbols; garbage is refused.
        assert!(matches!(kernel_id(b"not elf"), Err(SignError::Kernel { .. })));
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        if let Ok(id) = kernel_id(&exe) {
            assert!(!id.is_empty() && id.len() <= KERNEL_ID_MAX);
        }
    }

    #[test]
    fn refusals() {
        let k = key(7);
        let trusted = [k.verifying_key()];
        assert_eq!(verify(b"plain module", &trusted), Err(SignError::NotSigned));
        let signed = sign(b"module bytes", &k);
        // Untrusted signer.
        assert!(matches!(
            verify(&signed, &[key(2).verifying_key()]),
            Err(SignError::UntrustedKey(_))
        ));
        // Modified module.
        let mut bad = signed.clone();
        bad[0] ^= 1;
        assert_eq!(verify(&bad, &trusted), Err(SignError::BadSignature));
        // Truncated: bytes cut from the front keep the trailer but break the length.
        assert!(matches!(
            verify(&signed[3..], &trusted),
            Err(SignError::Truncated { .. })
        ));
        // Truncated at the end: no magic.
        assert_eq!(verify(&signed[..signed.len() - 1], &trusted), Err(SignError::NotSigned));
    }

    #[test]
    fn key_files_are_private_exclusive_and_never_followed() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("lucos-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let k = d.join("a.key");
        write_key_file(&k, "secret", 0o600, false).unwrap();
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        // No silent overwrite.
        let e = write_key_file(&k, "other", 0o600, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read_to_string(&k).unwrap(), "secret\n");
        // A symlink is not followed, even with --force (the link is replaced, not its target).
        let target = d.join("target");
        std::fs::write(&target, "keep").unwrap();
        let l = d.join("l.key");
        std::os::unix::fs::symlink(&target, &l).unwrap();
        assert!(write_key_file(&l, "secret", 0o600, false).is_err());
        write_key_file(&l, "secret", 0o600, true).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&l).unwrap().file_type().is_symlink());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn key_files_roundtrip() {
        let (sk, pk) = generate_keypair().unwrap();
        let d = std::env::temp_dir().join(format!("lucos-keys-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("k"), &sk).unwrap();
        std::fs::write(d.join("k.pub"), &pk).unwrap();
        let s = load_signing_key(&d.join("k")).unwrap();
        let p = load_verifying_key(&d.join("k.pub")).unwrap();
        assert_eq!(s.verifying_key(), p);
        std::fs::write(d.join("bad"), "zz").unwrap();
        assert!(load_verifying_key(&d.join("bad")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
