//! The unix attestor: uid, gid, groups, executable path and hash of a caller.
//!
//! Produces SPIRE's `unix:` selectors from /proc and the agent's NSS. Only
//! kernel facts decide identity: the uid and gid come from
//! `/proc/<pid>/status` and must equal what `SO_PEERCRED` recorded at
//! connect, or attestation fails. Names are decoration looked up from those
//! numbers. A selector that cannot be produced (an unknown name, an
//! executable over the size limit) is omitted, which is safe: entries match
//! on subsets, so fewer selectors can only match fewer entries.
//!
//! This file reads the PID's /proc files; it does not decide whether those
//! reads described the caller. [`Caller::ensure_alive`] after the fact does.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use nix::unistd::{Gid, Group, Uid, User};

use super::procfs::{FileKey, ProcStatus};
use super::{AttestationError, Caller, UnixAttestorConfig, procfs};
use crate::registration::selector::{Selector, SelectorSet, SelectorType};

/// Executables whose hash is remembered. Each entry is ~150 bytes; the
/// bound keeps a caller that runs endless distinct binaries from growing
/// the agent, at the cost of rehashing.
const HASH_CACHE_CAPACITY: usize = 4096;

/// Read size while hashing: large enough to amortise syscalls; allocated
/// per hash and freed after, so idle memory does not depend on it.
const HASH_CHUNK_LEN: usize = 64 * 1024;

/// How long a user or group name looked up through NSS is reused. Names
/// are decoration on kernel ids; an edit to /etc/passwd or the directory
/// reaches selectors within this time.
pub(crate) const NAME_TTL: Duration = Duration::from_secs(10);

/// Names remembered; past this the cache starts over.
const NAME_CACHE_CAPACITY: usize = 4096;

/// The unix attestor with its executable-hash and name caches (shared by clones).
#[derive(Debug, Clone)]
pub(crate) struct UnixAttestor {
    config: UnixAttestorConfig,
    hashes: Arc<HashCache>,
    names: Arc<NameCache>,
}

/// What the unix attestor learned about one caller, with the facts it was
/// derived from (so a later call can tell whether they still hold).
#[derive(Debug)]
pub(crate) struct UnixFacts {
    pub(crate) executable: Option<PathBuf>,
    pub(crate) selectors: SelectorSet,
    /// The `/proc/<pid>/status` ids the selectors describe.
    pub(crate) status: ProcStatus,
    /// That file, open, for the re-checks of later calls.
    pub(crate) status_file: procfs::StatusFile,
    /// The executable's key, when `discover_workload_path` is on.
    pub(crate) exe_key: Option<FileKey>,
}

/// SHA-256 of executables by file identity. `None` records "too large to
/// hash", so the warning about it is logged once per file, not per call.
#[derive(Default)]
struct HashCache {
    entries: Mutex<HashMap<FileKey, Option<String>>>,
    hits: AtomicU64,
}

// === impl UnixAttestor ===

impl UnixAttestor {
    pub(crate) fn new(config: &UnixAttestorConfig) -> Self {
        Self {
            config: config.clone(),
            hashes: Arc::default(),
            names: Arc::default(),
        }
    }

    /// Reads the caller's /proc entries. Blocking: NSS lookups and hashing.
    pub(crate) fn attest(
        &self,
        proc_root: &Path,
        caller: &Caller,
    ) -> Result<UnixFacts, AttestationError> {
        let pid = caller.pid();
        let status_file = procfs::StatusFile::open(proc_root, pid)?;
        let status = status_file.read()?;
        // A process may change its effective ids after connect (setuid
        // binaries, privilege drops), and a recycled PID (fallback path)
        // may belong to another user. Either way the kernel's record of the
        // connection and the process we read disagree: refuse.
        if status.euid != caller.uid() || status.egid != caller.gid() {
            return Err(AttestationError::CredentialsChanged {
                pid,
                peer_uid: caller.uid(),
                peer_gid: caller.gid(),
                proc_uid: status.euid,
                proc_gid: status.egid,
            });
        }

        let mut selectors = SelectorSet::new();
        let unix = |key: &str, value: &dyn std::fmt::Display| {
            Selector::new(SelectorType::Unix, key, value)
        };
        selectors.insert(unix("uid", &status.euid));
        if let Some(name) = self.names.user(status.euid) {
            selectors.insert(unix("user", &name));
        }
        selectors.insert(unix("gid", &status.egid));
        if let Some(name) = self.names.group(status.egid) {
            selectors.insert(unix("group", &name));
        }
        for &gid in &status.groups {
            selectors.insert(unix("supplementary_gid", &gid));
            if let Some(name) = self.names.group(gid) {
                selectors.insert(unix("supplementary_group", &name));
            }
        }

        let mut executable = None;
        let mut exe_key = None;
        if self.config.discover_workload_path {
            // Open first: the hash cache key and the hashed bytes then come
            // from this one open file, whatever happens to the path.
            let (exe, file) = procfs::open_exe(proc_root, pid)?;
            let key = procfs::key_of_open(&exe, &file)?;
            // The program that connected must be the one running now: after
            // an exec, a socket handed to (or kept by) another process would
            // otherwise speak with the new program's identity.
            if !caller
                .executable_at_connect()
                .is_some_and(|pinned| pinned.same_file(&key))
            {
                return Err(AttestationError::ExecutableChanged { pid });
            }
            let path = procfs::read_exe_link(proc_root, pid)?;
            let hash = self.sha256(pid, &exe, &file, key)?;
            // The link is read apart from the open. Had the process exec'd
            // in between, path and hash would describe different programs.
            if !procfs::stat_exe(proc_root, pid)?.same_file(&key) {
                return Err(AttestationError::ExecutableChanged { pid });
            }
            exe_key = Some(key);
            match path.to_str() {
                // The link names the file in the caller's own mount
                // namespace, which the caller may have made (`unshare -m`,
                // a container) to put any file at any path: only a path
                // that leads, in the agent's namespace, to the very file
                // the process runs is a fact.
                Some(text) if path.is_absolute() && names_here(&path, &key) => {
                    selectors.insert(unix("path", &text));
                }
                Some(_) if path.is_absolute() => {
                    tracing::debug!(pid, path = ?path, "the executable's path leads elsewhere in the agent's mount namespace (another namespace: a container, unshare); no unix:path selector")
                }
                // A lossy rendering could collide with a real path; no
                // selector is the safe answer.
                _ => {
                    tracing::debug!(pid, path = ?path, "executable path is not absolute UTF-8; no unix:path selector")
                }
            }
            if let Some(hash) = hash {
                selectors.insert(unix("sha256", &hash));
            }
            executable = Some(path);
        }
        Ok(UnixFacts {
            executable,
            selectors,
            status,
            status_file,
            exe_key,
        })
    }

    /// SHA-256 of the open executable, from the cache when its identity is known.
    ///
    /// Keyed and hashed from the same open file, so a rename or replace
    /// between looking and reading cannot pair one file's key with
    /// another's content.
    fn sha256(
        &self,
        pid: i32,
        path: &Path,
        file: &File,
        key: FileKey,
    ) -> Result<Option<String>, AttestationError> {
        let read_err = |source| AttestationError::ReadProc {
            path: path.to_owned(),
            source,
        };
        if let Some(cached) = self.hashes.get(&key) {
            return Ok(cached);
        }
        let limit = self.config.workload_size_limit;
        if key.size > limit {
            tracing::warn!(
                pid,
                size = key.size,
                limit,
                "executable larger than workload_size_limit; no unix:sha256 selector"
            );
            self.hashes.insert(key, None);
            return Ok(None);
        }

        let mut context = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0_u8; HASH_CHUNK_LEN];
        let mut total: u64 = 0;
        let mut reader = file;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(error) => return Err(read_err(error)),
            };
            total = total.saturating_add(n as u64);
            if total > limit {
                tracing::warn!(
                    pid,
                    limit,
                    "executable grew past workload_size_limit while hashing; no unix:sha256 selector"
                );
                return Ok(None);
            }
            context.update(buf.get(..n).unwrap_or_default());
        }
        // Written to while we read it: the digest describes no version of the
        // file, so neither use nor cache it.
        if FileKey::of(&file.metadata().map_err(read_err)?) != key {
            tracing::warn!(
                pid,
                "executable changed while hashing; no unix:sha256 selector"
            );
            return Ok(None);
        }
        let hash = to_hex(context.finish().as_ref());
        self.hashes.insert(key, Some(hash.clone()));
        Ok(Some(hash))
    }

    #[cfg(test)]
    pub(crate) fn cache_hits(&self) -> u64 {
        self.hashes.hits.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn cache_len(&self) -> usize {
        self.hashes.lock().len()
    }
}

/// Whether `path`, looked up in the agent's own mount namespace, is the
/// file `key` was taken from (same device and inode).
fn names_here(path: &Path, key: &FileKey) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| FileKey::of(&meta).same_file(key))
}

/// Which NSS database a name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NameKind {
    User,
    Group,
}

/// When a name was looked up, and the answer (`None`: no such id).
type NameEntry = (Instant, Option<String>);

/// NSS answers by id for [`NAME_TTL`]. Each lookup through libc reads and
/// parses /etc/passwd or /etc/group (or asks a directory service); a busy
/// node attests the same few ids thousands of times a second.
#[derive(Debug, Default)]
struct NameCache {
    entries: Mutex<HashMap<(NameKind, u32), NameEntry>>,
}

// === impl NameCache ===

impl NameCache {
    /// The user name of `uid`; `None` (omit the selector) when unknown.
    fn user(&self, uid: u32) -> Option<String> {
        self.lookup(NameKind::User, uid)
    }

    /// The group name of `gid`; `None` (omit the selector) when unknown.
    fn group(&self, gid: u32) -> Option<String> {
        self.lookup(NameKind::Group, gid)
    }

    fn lookup(&self, kind: NameKind, id: u32) -> Option<String> {
        let now = Instant::now();
        if let Some((at, name)) = self.lock().get(&(kind, id))
            && now.saturating_duration_since(*at) < NAME_TTL
        {
            return name.clone();
        }
        // Looked up without the lock: NSS may be slow, and two threads
        // looking up the same id at once only do the work twice.
        let name = match kind {
            NameKind::User => user_name(id),
            NameKind::Group => group_name(id),
        };
        let mut entries = self.lock();
        if entries.len() >= NAME_CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert((kind, id), (now, name.clone()));
        name
    }

    /// Every operation leaves the map valid, so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NameKind, u32), NameEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The agent's NSS name for a uid; `None` when unknown.
fn user_name(uid: u32) -> Option<String> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(user) => user.map(|u| u.name),
        Err(error) => {
            tracing::debug!(uid, error = %crate::error::Chain(&error), "user lookup failed; no unix:user selector");
            None
        }
    }
}

/// The agent's NSS name for a gid; `None` when unknown.
fn group_name(gid: u32) -> Option<String> {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(group) => group.map(|g| g.name),
        Err(error) => {
            tracing::debug!(gid, error = %crate::error::Chain(&error), "group lookup failed; no group selector");
            None
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
}

// === impl HashCache ===

impl HashCache {
    /// A poisoned lock only means a panic elsewhere mid-call; every map
    /// operation here leaves the map valid, so keep using it.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, Option<String>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, key: &FileKey) -> Option<Option<String>> {
        let found = self.lock().get(key).cloned();
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn insert(&self, key: FileKey, hash: Option<String>) {
        let mut entries = self.lock();
        if entries.len() >= HASH_CACHE_CAPACITY && !entries.contains_key(&key) {
            // Evict an arbitrary entry: the map's random order makes it
            // unpredictable to a caller trying to flush a particular binary.
            if let Some(victim) = entries.keys().next().copied() {
                entries.remove(&victim);
            }
        }
        entries.insert(key, hash);
    }
}

/// Sizes, not contents: an `Attestor` in a log line must not dump 4096 hashes.
impl std::fmt::Debug for HashCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashCache")
            .field("entries", &self.lock().len())
            .field("hits", &self.hits.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn cache_is_bounded() {
        let cache = HashCache::default();
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 0,
            mtime: (0, 0),
            ctime: (0, 0),
        };
        for ino in 0..(HASH_CACHE_CAPACITY as u64 + 10) {
            cache.insert(key(ino), None);
        }
        assert_eq!(cache.lock().len(), HASH_CACHE_CAPACITY);
        let last = key(HASH_CACHE_CAPACITY as u64 + 9);
        assert_eq!(cache.get(&last), Some(None));
        assert_eq!(cache.hits.load(Ordering::Relaxed), 1);
    }
}
