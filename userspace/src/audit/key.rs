//! The daemon's audit signing key (Ed25519) and the public half a verifier
//! holds.
//!
//! The key file is the 32-byte seed as 64 hex digits and a newline, made
//! on the daemon's first start (0600, in a directory the daemon makes 0700)
//! and read again on every later start so the trail keeps one signer. A key
//! file that group or others can read, or that is not root's, is refused.
//! The seed never leaves this module: no `Debug`, no log line, no record
//! shows more than the key id and the public half.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// Why a key could not be read, made or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{0}")]
    Public(String),
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// The id of a public key: the first 8 bytes of its SHA-256, as hex.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

/// The signing key of one daemon.
pub struct AuditKey {
    signing: SigningKey,
    id: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A new key from the system's randomness, held only in memory.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        aws_lc_rs::rand::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = Self::from_seed(&seed);
        seed.zeroize();
        Ok(key)
    }

    fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let id = key_id(&signing.verifying_key());
        Self { signing, id }
    }

    /// Reads the key at `path`, or makes it there if there is none yet.
    /// Returns the key and whether it was made now.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let io = |source| KeyError::Io { path: path.to_owned(), source };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.exists() {
                        std::fs::create_dir_all(dir).map_err(io)?;
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
                    }
                }
                let key = Self::generate()?;
                // Written whole under a temporary name, then renamed: a
                // crash leaves no half key for the next start to trust.
                let temporary = path.with_extension("new");
                let _ = std::fs::remove_file(&temporary);
                let mut file =
                    OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary).map_err(io)?;
                let mut text = hex::encode(key.signing.to_bytes());
                text.push('\n');
                let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
                text.zeroize();
                written.map_err(io)?;
                std::fs::rename(&temporary, path).map_err(io)?;
                Ok((key, true))
            }
            Err(error) => Err(error),
        }
    }

    /// Reads the key at `path`; refuses one others could read or change.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let invalid = |why: &str| KeyError::Invalid { path: path.to_owned(), why: why.to_owned() };
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(invalid("group or others may read or write the audit key (chmod 600 it)"));
        }
        if meta.uid() != 0 && meta.uid() != current_uid() {
            return Err(invalid("the audit key belongs to another user"));
        }
        let mut text = std::fs::read_to_string(path).map_err(io)?;
        let mut seed = [0u8; 32];
        let parsed = hex::decode_to_slice(text.trim(), &mut seed);
        text.zeroize();
        if parsed.is_err() {
            seed.zeroize();
            return Err(invalid("not an audit key (expected 64 hex digits)"));
        }
        let key = Self::from_seed(&seed);
        seed.zeroize();
        Ok(key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { key: self.signing.verifying_key(), id: self.id.clone() }
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The public half: what `sluice audit pubkey` prints and `sluice audit
/// verify --key` reads (64 hex digits; lines starting with `#` are
/// comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| KeyError::Public("no public key in it".into()))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(line, &mut bytes)
            .map_err(|_| KeyError::Public("not an audit public key (expected 64 hex digits)".into()))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Public(format!("not an Ed25519 key: {e}")))?;
        Ok(Self { id: key_id(&key), key })
    }

    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| KeyError::Invalid { path: path.to_owned(), why: e.to_string() })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// Whether `signature` (64 bytes) is this key's over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else { return false };
        self.key.verify(message, &signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-audit-key-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn made_once_then_read_again_root_only() {
        let dir = temp_dir("made");
        let path = dir.join("state").join("audit.key");
        let (made, new) = AuditKey::load_or_create(&path).unwrap();
        assert!(new);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        let (again, new) = AuditKey::load_or_create(&path).unwrap();
        assert!(!new);
        assert_eq!(made.id(), again.id());
        assert_eq!(made.public(), again.public());
        let debug = format!("{made:?}");
        let seed = std::fs::read_to_string(&path).unwrap();
        assert!(!debug.contains(seed.trim()), "{debug}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(AuditKey::load(&path), Err(KeyError::Invalid { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn public_key_verifies_its_own_signatures_only() {
        let key = AuditKey::generate().unwrap();
        let other = AuditKey::generate().unwrap();
        let public = PublicKey::parse(&format!("# sluice audit key\n{}\n", key.public().hex())).unwrap();
        assert_eq!(public.id(), key.id());
        let signature = key.sign(b"checkpoint");
        assert!(public.verifies(b"checkpoint", &signature));
        assert!(!public.verifies(b"checkpoinT", &signature));
        assert!(!public.verifies(b"checkpoint", &other.sign(b"checkpoint")));
        assert!(PublicKey::parse("zz").is_err());
    }
}
