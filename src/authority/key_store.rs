//! Key material on disk: private keys are written 0600 and atomically
//! (temp file, fsync, rename, fsync the directory), and refused on read when
//! anyone but the owner could read them.
//!
//! tether's own files are opened with `O_NOFOLLOW`, in directories only the
//! agent (or root) can change, and each must be owned by the agent or root
//! ([`crate::trusted_fs`]): a key someone else planted is refused. Files the operator
//! mounts (the upstream CA of `[authority] kind = "disk"`) are read through
//! symlinks, because a Kubernetes Secret volume is a farm of them
//! (`tls.key -> ..data/tls.key`); the mode, type and size checks then apply
//! to the file the link points at.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::trusted_fs::{self, TrustedFsError};

/// Largest key or state file read, in bytes: anything bigger is not ours.
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The file system refused.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A private key file others could read: refuse rather than use a key
    /// that may be copied.
    #[error(
        "{path} has mode {mode:04o}; a private key must be readable by its owner only (chmod 600)"
    )]
    Permissive {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file (a symlink, a directory, a device).
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// Larger than any key or state file tether writes.
    #[error("{0} is larger than {MAX_FILE_LEN} bytes: not a tether file")]
    TooLarge(PathBuf),
    /// A directory or file someone else could have prepared.
    #[error(transparent)]
    Untrusted(#[from] TrustedFsError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyStoreError + '_ {
    move |source| KeyStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; an existing one
/// must be trusted, and is narrowed to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), KeyStoreError> {
    trusted_fs::dir(dir, 0o700)?;
    Ok(trusted_fs::set_mode(dir, 0o700)?)
}

/// Writes a secret: mode 0600, all or nothing.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyStoreError> {
    write_atomic(path, bytes, 0o600)
}

/// Writes a public file (certificates, state): mode 0644, all or nothing.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), KeyStoreError> {
    write_atomic(path, bytes, 0o644)
}

/// Reads a secret written by [`write_secret`], refusing group/other access.
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    read_secret_from(path, open_regular(path, Links::Refuse)?)
}

/// Reads a secret the operator provides (an upstream CA key), following
/// symlinks, refusing group/other access to the file they lead to.
pub fn read_mounted_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    read_secret_from(path, open_regular(path, Links::Follow)?)
}

/// Reads a public file the operator provides (an upstream CA certificate),
/// following symlinks.
pub fn read_mounted(path: &Path) -> Result<Vec<u8>, KeyStoreError> {
    let mut file = open_regular(path, Links::Follow)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(bytes)
}

fn read_secret_from(path: &Path, mut file: File) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    let meta = file.metadata().map_err(io_err(path))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::Permissive {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(bytes)
}

/// Reads a public file, or `None` when it does not exist.
pub fn read_public(path: &Path) -> Result<Option<Vec<u8>>, KeyStoreError> {
    let mut file = match open_regular(path, Links::Refuse) {
        Ok(file) => file,
        Err(KeyStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(Some(bytes))
}

/// Removes a file; a file already gone is fine.
pub fn remove(path: &Path) -> Result<(), KeyStoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Whether a symlink at the path itself is followed.
#[derive(Clone, Copy)]
enum Links {
    /// tether's own files: a key path swapped for a symlink is refused.
    Refuse,
    /// Operator-mounted files: Secret volumes are symlinks by design.
    Follow,
}

fn open_regular(path: &Path, links: Links) -> Result<File, KeyStoreError> {
    let flags = match links {
        Links::Refuse => nix::libc::O_NOFOLLOW,
        Links::Follow => 0,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(KeyStoreError::NotRegular(path.to_owned()));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(KeyStoreError::TooLarge(path.to_owned()));
    }
    // Owner and write access; whether others may read a secret is
    // `read_secret_from`'s to say, with its own advice.
    trusted_fs::check_file(path, &meta, false)?;
    Ok(file)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyStoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.tmp"));
    // A leftover from a crash mid-write is ours to replace.
    remove(&tmp)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_missing_file_prints_its_path_and_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let err = read_secret(&path).unwrap_err();
        assert_eq!(err.to_string(), path.display().to_string());
        let text = crate::error::chain(&err);
        assert!(
            text.starts_with(&format!("{}: No such file or directory", path.display())),
            "{text}"
        );
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }

    #[test]
    fn secrets_are_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_secret(&path, b"secret").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(&**read_secret(&path).unwrap(), b"secret");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(err.to_string().contains("mode 0644"), "{err}");
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        write_secret(&real, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(read_secret(&link).is_err());
    }

    #[test]
    fn mounted_secrets_follow_links_and_check_the_target() {
        // The shape of a Kubernetes Secret volume: key -> ..data/key.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("..data")).unwrap();
        let real = dir.path().join("..data/key.pem");
        write_secret(&real, b"secret").unwrap();
        let link = dir.path().join("key.pem");
        std::os::unix::fs::symlink("..data/key.pem", &link).unwrap();
        assert_eq!(&**read_mounted_secret(&link).unwrap(), b"secret");

        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_mounted_secret(&link).unwrap_err();
        assert!(err.to_string().contains("mode 0644"), "{err}");
        assert_eq!(read_mounted(&link).unwrap(), b"secret");
    }

    #[test]
    fn overwrite_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_public(&path, b"first version, long").unwrap();
        write_public(&path, b"second").unwrap();
        assert_eq!(read_public(&path).unwrap().unwrap(), b"second");
        assert!(read_public(&dir.path().join("missing")).unwrap().is_none());
    }
}
