//! Module signatures: ed25519 over the module bytes, appended as a trailer so a signed
//! module is one file:
//!
//! ```text
//! [module][signature: 64][public key: 32][module length: u64 LE][magic "~lucos-signed-1~"]
//! ```
//!
//! Keys are stored as hex text: a private key file holds the 32-byte seed, a public key
//! file the 32-byte key.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

/// Last 16 bytes of a signed module: marks the signature trailer (and its version).
pub const MAGIC: &[u8; 16] = b"~lucos-signed-1~";
const TRAILER: usize = 64 + 32 + 8 + 16;

/// Why a signed module or a key file is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignError {
    /// The data is shorter than a trailer or does not end with [`MAGIC`].
    #[error("module is not signed (no lucos signature trailer): sign it with `lucosctl sign`")]
    NotSigned,
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

/// A new key pair from the OS's random source: (private seed hex, public key hex).
pub fn generate_keypair() -> std::io::Result<(String, String)> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let sk = SigningKey::from_bytes(&seed);
    Ok((hex(&seed), hex(&sk.verifying_key().to_bytes())))
}

/// Appends a signature trailer to `module`.
pub fn sign(module: &[u8], key: &SigningKey) -> Vec<u8> {
    let sig = key.sign(module);
    let mut out = Vec::with_capacity(module.len() + TRAILER);
    out.extend_from_slice(module);
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(&key.verifying_key().to_bytes());
    out.extend_from_slice(&(module.len() as u64).to_le_bytes());
    out.extend_from_slice(MAGIC);
    out
}

/// Checks the trailer against the trusted keys; returns the module bytes and the signer.
pub fn verify<'a>(signed: &'a [u8], trusted: &[VerifyingKey]) -> Result<(&'a [u8], VerifyingKey), SignError> {
    if signed.len() < TRAILER || &signed[signed.len() - 16..] != MAGIC {
        return Err(SignError::NotSigned);
    }
    let t = signed.len() - TRAILER;
    let claimed = u64::from_le_bytes(signed[t + 96..t + 104].try_into().expect("8 bytes"));
    if claimed != t as u64 {
        return Err(SignError::Truncated {
            claimed,
            actual: t as u64,
        });
    }
    let module = &signed[..t];
    let sig = Signature::from_bytes(signed[t..t + 64].try_into().expect("64 bytes"));
    let key_bytes: [u8; 32] = signed[t + 64..t + 96].try_into().expect("32 bytes");
    let key = trusted
        .iter()
        .find(|k| k.to_bytes() == key_bytes)
        .copied()
        .ok_or_else(|| SignError::UntrustedKey(hex(&key_bytes[..8])))?;
    key.verify(module, &sig).map_err(|_| SignError::BadSignature)?;
    Ok((module, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn sign_and_verify() {
        let k = key(7);
        let signed = sign(b"module bytes", &k);
        let (m, signer) = verify(&signed, &[key(1).verifying_key(), k.verifying_key()]).unwrap();
        assert_eq!(m, b"module bytes");
        assert_eq!(signer, k.verifying_key());
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
