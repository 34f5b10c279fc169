//! A scheduler's audit-head signing key: ed25519, made at first start in its
//! data dir (`audit-signing.pk8`, PKCS#8, 0600) and loaded at every later one.
//! Each scheduler has its own; `head` has what is signed and how it is checked.

use std::path::Path;

use anyhow::Context;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::head::{self, SignedHead};

pub const KEY_FILE: &str = "audit-signing.pk8";

pub struct Signer {
    key: Ed25519KeyPair,
    scheduler_id: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Signer(scheduler {}, key {})",
            self.scheduler_id,
            self.public_key()
        )
    }
}

impl Signer {
    /// Loads the key in `data_dir`, or makes one there.
    pub fn load_or_create(data_dir: &Path, scheduler_id: u64) -> anyhow::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => {
                // Kept like the raft log's files: the owner's alone.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("restricting {}", path.display()))?;
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| anyhow::anyhow!("making an ed25519 key: no random source"))?;
                // Written aside and renamed, so that a crash never leaves half a key.
                let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
                crate::tls::write_file(&tmp, doc.as_ref(), 0o600)?;
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
                tracing::info!("made the audit-head signing key {}", path.display());
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
            anyhow::anyhow!(
                "{}: not an ed25519 key in PKCS#8 ({e}); move it away to make a new one",
                path.display()
            )
        })?;
        Ok(Self { key, scheduler_id })
    }

    /// The public key, hex (as heads carry it).
    pub fn public_key(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }

    /// This scheduler's signature over the head `(seq, hash)` at `at_ms`.
    pub fn sign(&self, seq: u64, hash: &str, at_ms: i64) -> SignedHead {
        head::sign(&self.key, seq, hash, at_ms, self.scheduler_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_kept_private_and_loaded_again() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(d.path(), 3).unwrap();
        let path = d.path().join(KEY_FILE);
        let mode = || std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(), 0o600);
        let h = s.sign(0, coop_core::ledger::GENESIS, 42);
        assert_eq!(head::check_signature(&h), Ok(()));
        assert_eq!(h.scheduler_id, 3);
        assert_eq!(h.public_key, s.public_key());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = Signer::load_or_create(d.path(), 3).unwrap();
        assert_eq!(again.public_key(), s.public_key(), "the same key");
        assert_eq!(mode(), 0o600, "tightened");

        std::fs::write(&path, b"not a key").unwrap();
        let err = Signer::load_or_create(d.path(), 3).unwrap_err().to_string();
        assert!(err.contains(KEY_FILE) && err.contains("ed25519"), "{err}");
    }
}
