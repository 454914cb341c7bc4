//! The directories and files the agent trusts: its sockets, data dir, keys,
//! store and audit trail live only where no other user can change them.
//!
//! A path is trusted when the agent's own uid (or root) owns it, nobody
//! else may write it, it is not a symlink, and the same holds for every
//! directory above it, where a sticky world-writable directory (`/tmp`) is
//! also fine: there others may add names but not move or remove ours, and
//! a name someone else added first fails the ownership check. What another
//! user could have prepared (a directory under `/tmp` made before the agent
//! started, a key planted in a directory they can write) is refused with
//! the path, its owner and its mode, and nothing is changed.
//!
//! Invariant: every check reads the link itself (`lstat`, `O_NOFOLLOW`);
//! modes are set with `AT_SYMLINK_NOFOLLOW`. Only the symlinks above a
//! path are followed, once each is known to be owned by root or the agent
//! and to sit in a trusted directory.

use std::fs::{self, DirBuilder, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{FchmodatFlags, Mode, fchmodat};

/// Group- or other-writable bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Any access for group or others.
const OPEN_TO_OTHERS: u32 = 0o077;
/// The sticky bit: in such a directory only an entry's owner may rename or
/// remove it.
const STICKY: u32 = 0o1000;

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustedFsError {
    /// Someone other than the agent's uid and root owns it.
    #[error(
        "{} is owned by uid {owner} (mode {mode:04o}); {}: remove it, or choose another path",
        path.display(),
        trusted_owners(*uid)
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its mode.
        mode: u32,
        /// The uid that trusts only its own and root's.
        uid: u32,
    },
    /// Group or others may write it (or, for a secret, read it).
    #[error(
        "{} has mode {mode:04o} (owner uid {owner}): {problem}; tighten it (chmod) or choose \
         another path",
        path.display()
    )]
    Mode {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its mode.
        mode: u32,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A file with more than one name: through another one, somewhere the
    /// agent does not check, it may be read or changed.
    #[error(
        "{} has {links} hard links: through another name it may be read or changed; tether \
         keeps its state only in files with one name",
        path.display()
    )]
    Links {
        /// The path.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
    /// A symlink where the agent keeps its own things.
    #[error("{} is a symlink; tether keeps its sockets and state only in real directories and files", .0.display())]
    Symlink(PathBuf),
    /// Not a directory (or not a regular file) where one is expected.
    #[error("{} is not a {expected}", path.display())]
    Kind {
        /// The path.
        path: PathBuf,
        /// What it should be.
        expected: &'static str,
    },
    /// The file system refused.
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Whose files the agent trusts, in words.
fn trusted_owners(uid: u32) -> String {
    if uid == 0 {
        "tether, running as root, trusts only what root owns".to_owned()
    } else {
        format!("tether, running as uid {uid}, trusts only what uid {uid} or root owns")
    }
}

/// The uid whose files the agent trusts besides root's: its own.
fn agent_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TrustedFsError + '_ {
    move |source| TrustedFsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes `dir` the agent's directory: creates it (and any missing parent)
/// with `mode` when it does not exist, or accepts an existing one only when
/// it is trusted. Either way every directory above it must be trusted too.
/// An existing directory keeps its mode (it was checked not to let others
/// write), with one exception: an *empty*, non-sticky directory the
/// agent's own uid owns that others may write (a Kubernetes `emptyDir` is
/// made 0777) is given `mode` and, found still empty, is as good as one
/// just created. (A sticky one, `/tmp` or `/dev/shm`, is shared on purpose
/// and refused as it is.)
pub fn dir(dir: &Path, mode: u32) -> Result<(), TrustedFsError> {
    let uid = agent_uid();
    let dir = absolute(dir)?;
    check_ancestors(&dir, uid)?;
    // Missing directories, outermost first, each created with `mode`; one
    // that appears meanwhile (someone else's, in a sticky directory) is
    // judged below like any existing one.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(
            |p| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound),
        )
        .collect();
    for path in missing.into_iter().rev() {
        match DirBuilder::new().mode(mode).create(path) {
            Ok(()) => set_mode(path, mode)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_own_dir(path, uid)?,
            Err(e) => return Err(io_error(path)(e)),
        }
    }
    // Again, now that every directory on the way exists: one that someone
    // else made between the first walk and the creation above would
    // otherwise hold the agent's new directory.
    check_ancestors(&dir, uid)?;
    if let Ok(meta) = fs::symlink_metadata(&dir)
        && meta.is_dir()
        && meta.uid() == uid
        && meta.mode() & WRITABLE_BY_OTHERS != 0
        && meta.mode() & STICKY == 0
        && is_empty(&dir)?
    {
        let was = meta.mode() & 0o7777;
        set_mode(&dir, mode)?;
        // Whatever appeared before the mode changed could be someone
        // else's: refused, and the mode put back as it was found.
        if !is_empty(&dir)? {
            set_mode(&dir, was)?;
            return Err(TrustedFsError::Mode {
                path: dir,
                owner: uid,
                mode: was,
                problem: "others could write it, and something appeared in it meanwhile",
            });
        }
    }
    check_own_dir(&dir, uid)
}

fn is_empty(dir: &Path) -> Result<bool, TrustedFsError> {
    Ok(fs::read_dir(dir).map_err(io_error(dir))?.next().is_none())
}

/// Checks that `dir` exists and is trusted by `uid` (owned by it or root,
/// nobody else may write it), as are the directories above it; changes
/// nothing. What a client checks before it talks to its agent through a
/// socket in `dir`.
pub fn check_dir(dir: &Path, uid: u32) -> Result<(), TrustedFsError> {
    let dir = absolute(dir)?;
    check_ancestors(&dir, uid)?;
    check_own_dir(&dir, uid)
}

/// Checks an opened file the agent keeps state or keys in, from its
/// `fstat`: a regular file with one name, owned by the agent or root, not
/// writable by others and, when `secret`, not open to them at all.
pub fn check_file(path: &Path, meta: &Metadata, secret: bool) -> Result<(), TrustedFsError> {
    if meta.file_type().is_symlink() {
        return Err(TrustedFsError::Symlink(path.to_owned()));
    }
    if !meta.file_type().is_file() {
        return Err(TrustedFsError::Kind {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    check_owner(path, meta, agent_uid())?;
    if meta.nlink() > 1 {
        return Err(TrustedFsError::Links {
            path: path.to_owned(),
            links: meta.nlink(),
        });
    }
    let mode = meta.mode() & 0o7777;
    let problem = if secret && mode & OPEN_TO_OTHERS != 0 {
        "a secret must be readable by its owner only"
    } else if mode & WRITABLE_BY_OTHERS != 0 {
        "group or others may write it"
    } else {
        return Ok(());
    };
    Err(TrustedFsError::Mode {
        path: path.to_owned(),
        owner: meta.uid(),
        mode,
        problem,
    })
}

/// Sets the mode of `path` without following a symlink there.
pub fn set_mode(path: &Path, mode: u32) -> Result<(), TrustedFsError> {
    fchmodat(
        AT_FDCWD,
        path,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::NoFollowSymlink,
    )
    .map_err(|errno| io_error(path)(errno.into()))
}

/// `path`, made absolute against the working directory, so its ancestors
/// can all be checked.
fn absolute(path: &Path) -> Result<PathBuf, TrustedFsError> {
    std::path::absolute(path).map_err(io_error(path))
}

/// The agent's own directory: a real directory, owned by the agent or
/// root, that nobody else may write (no sticky exception here: the agent
/// shares its own directories with nobody).
fn check_own_dir(dir: &Path, uid: u32) -> Result<(), TrustedFsError> {
    let meta = fs::symlink_metadata(dir).map_err(io_error(dir))?;
    if meta.file_type().is_symlink() {
        return Err(TrustedFsError::Symlink(dir.to_owned()));
    }
    if !meta.is_dir() {
        return Err(TrustedFsError::Kind {
            path: dir.to_owned(),
            expected: "directory",
        });
    }
    check_owner(dir, &meta, uid)?;
    let mode = meta.mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(TrustedFsError::Mode {
            path: dir.to_owned(),
            owner: meta.uid(),
            mode,
            problem: "group or others may add, rename or remove what is in it",
        });
    }
    Ok(())
}

/// Every existing directory above `path` is trusted as a parent: owned by
/// the agent or root, and not writable by others unless sticky. A symlink
/// among them must be owned by the agent or root (in a sticky directory
/// its owner could retarget it), and where it leads is checked the same
/// way, link by link, each link's own directory included.
fn check_ancestors(path: &Path, uid: u32) -> Result<(), TrustedFsError> {
    match path.parent() {
        Some(parent) => check_chain(parent, uid, MAX_LINKS),
        None => Ok(()),
    }
}

/// Most symlinks followed above one path (the kernel's own limit).
const MAX_LINKS: u32 = 40;

/// `dir` and every directory above it, as parents; symlinks followed one
/// at a time. Components that do not exist yet are skipped (the caller
/// creates them).
fn check_chain(dir: &Path, uid: u32, links_left: u32) -> Result<(), TrustedFsError> {
    for ancestor in dir.ancestors() {
        let meta = match fs::symlink_metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(ancestor)(e)),
        };
        if meta.file_type().is_symlink() {
            check_owner(ancestor, &meta, uid)?;
            let target = link_target(ancestor)?;
            let links_left = links_left
                .checked_sub(1)
                .ok_or_else(|| TrustedFsError::Symlink(ancestor.to_owned()))?;
            check_chain(&target, uid, links_left)?;
        } else if meta.is_dir() {
            check_parent(ancestor, &meta, uid)?;
        } else {
            return Err(TrustedFsError::Kind {
                path: ancestor.to_owned(),
                expected: "directory",
            });
        }
    }
    Ok(())
}

/// Where the symlink `link` leads, as an absolute path without `.` or `..`:
/// a relative target is taken from the link's directory, resolved (its
/// own links were checked on the way to `link`). A `..` after the first
/// name in a target could climb out of a link that is not walked here:
/// refused.
fn link_target(link: &Path) -> Result<PathBuf, TrustedFsError> {
    use std::path::Component;
    let target = fs::read_link(link).map_err(io_error(link))?;
    let mut resolved = if target.is_absolute() {
        PathBuf::from("/")
    } else {
        let parent = link.parent().unwrap_or(Path::new("/"));
        fs::canonicalize(parent).map_err(io_error(parent))?
    };
    let mut named = false;
    for component in target.components() {
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir if !named => {
                resolved.pop();
            }
            Component::ParentDir => return Err(TrustedFsError::Symlink(link.to_owned())),
            Component::Normal(name) => {
                named = true;
                resolved.push(name);
            }
        }
    }
    Ok(resolved)
}

fn check_parent(dir: &Path, meta: &Metadata, uid: u32) -> Result<(), TrustedFsError> {
    check_owner(dir, meta, uid)?;
    let mode = meta.mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 && mode & STICKY == 0 {
        return Err(TrustedFsError::Mode {
            path: dir.to_owned(),
            owner: meta.uid(),
            mode,
            problem: "group or others may replace what is in it (not sticky)",
        });
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &Metadata, uid: u32) -> Result<(), TrustedFsError> {
    if meta.uid() == uid || meta.uid() == 0 {
        return Ok(());
    }
    Err(TrustedFsError::Owner {
        path: path.to_owned(),
        owner: meta.uid(),
        mode: meta.mode() & 0o7777,
        uid,
    })
}

#[cfg(test)]
mod tests;
