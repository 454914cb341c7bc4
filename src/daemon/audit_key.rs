//! The agent's audit key on disk: `<data_dir>/audit.key` (Ed25519,
//! PKCS#8, 0600), created at the first start and then kept; its public
//! part published beside it as `<data_dir>/audit.pub` (PEM, 0644), written
//! again whenever it is missing or does not match. The key seals the audit
//! trail's `HEAD` (see `audit::seal`); operators copy `audit.pub` off the
//! node and give it to `tether audit verify --public-key`.
//!
//! Both files go through `authority::key_store`: `O_NOFOLLOW`, owned by
//! the agent or root, in the data directory the daemon has already found
//! trusted; a key readable by others is refused, never used.

use std::io;
use std::path::Path;

use anyhow::Context as _;

use crate::audit::SigningKey;
use crate::authority::key_store::{self, KeyStoreError};

/// The private key's file name in the data directory.
pub const KEY_FILE: &str = "audit.key";
/// The published public key's file name in the data directory.
pub const PUBLIC_FILE: &str = "audit.pub";

/// Reads the audit key, or creates it on the first start, and makes sure
/// its public part is published.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = data_dir.join(KEY_FILE);
    let key = match key_store::read_secret(&path) {
        Ok(der) => SigningKey::from_pkcs8(&der)
            .with_context(|| format!("reading the audit key {}", path.display()))?,
        Err(KeyStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let (key, der) = SigningKey::generate().context("creating the audit key")?;
            key_store::write_secret(&path, &der)
                .with_context(|| format!("writing the audit key {}", path.display()))?;
            tracing::info!(key_id = key.id(), path = %path.display(), "created the audit key");
            key
        }
        Err(error) => {
            return Err(error).with_context(|| format!("reading the audit key {}", path.display()));
        }
    };

    let public = data_dir.join(PUBLIC_FILE);
    let pem = key.public_key().to_pem();
    let published =
        key_store::read_public(&public).with_context(|| format!("reading {}", public.display()))?;
    if published.as_deref() != Some(pem.as_bytes()) {
        key_store::write_public(&public, pem.as_bytes())
            .with_context(|| format!("publishing the audit key as {}", public.display()))?;
    }
    tracing::info!(
        key_id = key.id(),
        public_key = %public.display(),
        "the audit trail is sealed with this key (copy the public key off the node for `tether audit verify --public-key`)"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::audit::PublicKey;

    #[test]
    fn the_key_is_created_once_kept_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let mode = |name| {
            fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(PUBLIC_FILE), 0o644);

        // A removed or altered public file is written again; the key stays.
        fs::write(dir.path().join(PUBLIC_FILE), "changed").unwrap();
        let second = load_or_create(dir.path()).unwrap();
        assert_eq!(second.id(), first.id());
        let published =
            PublicKey::from_pem(&fs::read(dir.path().join(PUBLIC_FILE)).unwrap()).unwrap();
        assert_eq!(published.id(), first.id());
    }

    #[test]
    fn a_key_others_can_read_or_that_is_not_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let error = format!("{:#}", load_or_create(dir.path()).unwrap_err());
        assert!(error.contains("mode 0644"), "{error}");

        fs::write(&key, "garbage").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let error = format!("{:#}", load_or_create(dir.path()).unwrap_err());
        assert!(error.contains("not an Ed25519 PKCS#8 key"), "{error}");
    }
}
