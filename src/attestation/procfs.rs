//! /proc parsers: pure functions over bytes, plus thin wrappers that read the files.
//!
//! The parsers are where untrusted text meets the agent. /proc is written by
//! the kernel, but a process chooses its own name (`comm`, up to 15 bytes of
//! anything but NUL), and that name appears in `stat` unescaped. So every
//! parser returns a [`ProcfsError`] on input it does not understand and never
//! panics, indexes out of bounds or guesses.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::AttestationError;
use super::caller::ProcessKey;

/// Most bytes read from one /proc text file. `status` and `stat` are a few
/// KiB; anything larger is not a file we understand.
const MAX_PROC_FILE_LEN: u64 = 64 * 1024;

/// Buffer for one /proc text file: `status` is under 2 KiB.
const PROC_READ_CAPACITY: usize = 4096;

/// Fields of `stat` before the process name: `pid (comm)`. The start time is
/// field 22 (1-based) of the whole line, so it is the 20th field after `)`.
const STARTTIME_INDEX_AFTER_COMM: usize = 22 - 3;
/// Field 4 (ppid), counted after the command name (fields 1 and 2).
const PPID_INDEX_AFTER_COMM: usize = 4 - 3;

/// Why the contents of a /proc file were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcfsError {
    /// A line that must appear exactly once is absent.
    #[error("no {0:?} line")]
    MissingLine(&'static str),
    /// A line that must appear exactly once appears again: someone is
    /// trying to inject one, or the format changed under us.
    #[error("{0:?} line appears more than once")]
    DuplicateLine(&'static str),
    /// A line is present but its fields are not what the kernel writes.
    #[error("malformed {0:?} line")]
    MalformedLine(&'static str),
    /// `stat` has no `)` closing the process name.
    #[error("no closing parenthesis after the process name")]
    MissingCommEnd,
    /// `stat` ends before the start-time field.
    #[error("too few fields after the process name")]
    MissingStartTime,
    /// The start-time field is not a decimal number.
    #[error("start time is not a number")]
    MalformedStartTime,
    /// The file is longer than any the kernel writes.
    #[error("longer than the kernel ever writes it")]
    TooLong,
}

/// The identity facts of `/proc/<pid>/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    /// Effective user id: the second field of `Uid:`.
    pub euid: u32,
    /// Effective group id: the second field of `Gid:`.
    pub egid: u32,
    /// Supplementary group ids, in the kernel's order (`Groups:`).
    pub groups: Vec<u32>,
}

/// Identity and version of a file, from `stat`/`fstat`.
///
/// A replaced file has a new inode, and changing one in place moves its
/// ctime, which no unprivileged process can set back; so, up to timestamp
/// granularity, a key names one content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// Size in bytes.
    pub(super) size: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
}

// === impl FileKey ===

impl FileKey {
    /// The key of a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// True when both name the same file (device and inode), whatever its
    /// version.
    pub fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

// === parsers ===

/// Parses `/proc/<pid>/status` for effective uid/gid and supplementary groups.
///
/// Each of `Uid:`, `Gid:` and `Groups:` must appear exactly once: the kernel
/// escapes the name on the `Name:` line, but refusing duplicates keeps that a
/// belt-and-braces property rather than the only defence against injection.
pub fn parse_status(contents: &[u8]) -> Result<ProcStatus, ProcfsError> {
    let mut uid = None;
    let mut gid = None;
    let mut groups = None;
    for line in contents.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"Uid:") {
            set_once(&mut uid, "Uid:", parse_ids("Uid:", rest)?)?;
        } else if let Some(rest) = line.strip_prefix(b"Gid:") {
            set_once(&mut gid, "Gid:", parse_ids("Gid:", rest)?)?;
        } else if let Some(rest) = line.strip_prefix(b"Groups:") {
            set_once(&mut groups, "Groups:", parse_ids("Groups:", rest)?)?;
        }
    }
    let uid = uid.ok_or(ProcfsError::MissingLine("Uid:"))?;
    let gid = gid.ok_or(ProcfsError::MissingLine("Gid:"))?;
    Ok(ProcStatus {
        euid: effective("Uid:", &uid)?,
        egid: effective("Gid:", &gid)?,
        groups: groups.ok_or(ProcfsError::MissingLine("Groups:"))?,
    })
}

/// Parses the start time (clock ticks after boot, field 22) from `/proc/<pid>/stat`.
///
/// The name between `(` and `)` may itself contain `)`, spaces and newlines,
/// so the fields are counted from the *last* `)`: everything after it is
/// numbers and a state letter the process cannot influence.
pub fn parse_stat_start_time(contents: &[u8]) -> Result<u64, ProcfsError> {
    let end = contents
        .iter()
        .rposition(|&b| b == b')')
        .ok_or(ProcfsError::MissingCommEnd)?;
    let after = contents.get(end + 1..).unwrap_or_default();
    let field = after
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
        .nth(STARTTIME_INDEX_AFTER_COMM)
        .ok_or(ProcfsError::MissingStartTime)?;
    parse_decimal(field).ok_or(ProcfsError::MalformedStartTime)
}

/// Parses the parent pid (field 4) and the start time (field 22) from
/// `/proc/<pid>/stat`, counting from the last `)` as
/// [`parse_stat_start_time`] does.
pub fn parse_stat_parent(contents: &[u8]) -> Result<(i32, u64), ProcfsError> {
    let end = contents
        .iter()
        .rposition(|&b| b == b')')
        .ok_or(ProcfsError::MissingCommEnd)?;
    let after = contents.get(end + 1..).unwrap_or_default();
    let ppid = after
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
        .nth(PPID_INDEX_AFTER_COMM)
        .and_then(parse_decimal)
        .and_then(|n| i32::try_from(n).ok())
        .ok_or(ProcfsError::MalformedStartTime)?;
    Ok((ppid, parse_stat_start_time(contents)?))
}

/// The ancestors of `pid` (its parent first), up to
/// `max` of them, stopping below init. A process that exits while its
/// chain is read ends the chain there.
pub fn read_lineage(proc_root: &Path, pid: i32, max: usize) -> Vec<ProcessKey> {
    let mut out = Vec::new();
    let parent_of = |pid: i32| {
        read_small(&pid_path(proc_root, pid, "stat"))
            .ok()
            .and_then(|c| parse_stat_parent(&c).ok())
    };
    let Some((mut next, _)) = parent_of(pid) else {
        return out;
    };
    while next > 1 && out.len() < max {
        let Some((ppid, start)) = parent_of(next) else {
            break;
        };
        out.push(ProcessKey::new(next, start));
        next = ppid;
    }
    out
}

fn set_once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), ProcfsError> {
    if slot.replace(value).is_some() {
        return Err(ProcfsError::DuplicateLine(name));
    }
    Ok(())
}

/// Whitespace-separated decimal ids; an empty list is valid (`Groups:`).
fn parse_ids(name: &'static str, rest: &[u8]) -> Result<Vec<u32>, ProcfsError> {
    rest.split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
        .map(|f| {
            parse_decimal(f)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(ProcfsError::MalformedLine(name))
        })
        .collect()
}

/// `Uid:`/`Gid:` carry real, effective, saved and filesystem ids, in that order.
fn effective(name: &'static str, ids: &[u32]) -> Result<u32, ProcfsError> {
    match ids {
        [_real, effective, _saved, _fs] => Ok(*effective),
        _ => Err(ProcfsError::MalformedLine(name)),
    }
}

/// Strict ASCII decimal: no sign, no spaces, at least one digit, no overflow.
fn parse_decimal(field: &[u8]) -> Option<u64> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

// === I/O ===

/// `<proc_root>/<pid>/<file>`.
pub fn pid_path(proc_root: &Path, pid: i32, file: &str) -> PathBuf {
    proc_root.join(pid.to_string()).join(file)
}

/// `<proc_root>/<pid>/cgroup`, at most [`super::k8s::MAX_CGROUP_FILE`]
/// bytes (the kernel writes a few hundred).
pub fn read_cgroup(proc_root: &Path, pid: i32) -> Result<String, AttestationError> {
    use std::io::Read as _;
    let path = pid_path(proc_root, pid, "cgroup");
    let mut text = String::new();
    File::open(&path)
        .and_then(|file| {
            file.take(super::k8s::MAX_CGROUP_FILE + 1)
                .read_to_string(&mut text)
        })
        .map_err(|source| AttestationError::ReadProc {
            path: path.clone(),
            source,
        })?;
    // Never a prefix of the file parsed as if it were all of it.
    if text.len() as u64 > super::k8s::MAX_CGROUP_FILE {
        return Err(AttestationError::ParseProc {
            path,
            source: ProcfsError::TooLong,
        });
    }
    Ok(text)
}

/// `<proc_root>/<pid>/status`, open: re-read with `pread(2)` from offset
/// 0, which renders the file again, without a path walk per read. An open
/// /proc file stays bound to the process it was opened for: once that
/// process is gone, reading fails, and never describes a process that
/// reused the PID.
#[derive(Debug)]
pub struct StatusFile {
    path: PathBuf,
    file: File,
}

impl StatusFile {
    /// Opens the caller's `status`. Like every read here, it describes the
    /// caller only if the caller is confirmed running afterwards.
    pub fn open(proc_root: &Path, pid: i32) -> Result<Self, AttestationError> {
        let path = pid_path(proc_root, pid, "status");
        match File::open(&path) {
            Ok(file) => Ok(Self { path, file }),
            Err(source) => Err(AttestationError::ReadProc { path, source }),
        }
    }

    /// The ids in `status` now.
    pub fn read(&self) -> Result<ProcStatus, AttestationError> {
        let contents = self
            .read_all()
            .map_err(|source| AttestationError::ReadProc {
                path: self.path.clone(),
                source,
            })?;
        parse_status(&contents).map_err(|source| AttestationError::ParseProc {
            path: self.path.clone(),
            source,
        })
    }

    /// The whole file from offset 0. procfs renders it whole at the first
    /// read and hands out as much as fits, so a read that does not fill the
    /// buffer has reached the end: usually one `pread(2)`.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        let mut contents = vec![0; PROC_READ_CAPACITY];
        let mut len = 0;
        loop {
            if len == contents.len() {
                if len as u64 >= MAX_PROC_FILE_LEN {
                    break;
                }
                contents.resize(len * 2, 0);
            }
            match self.file.read_at(&mut contents[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => {
                    len += n;
                    if len < contents.len() {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        contents.truncate(len);
        Ok(contents)
    }
}

/// Reads and parses the start time from `<proc_root>/<pid>/stat`.
pub fn read_start_time(proc_root: &Path, pid: i32) -> Result<u64, AttestationError> {
    let path = pid_path(proc_root, pid, "stat");
    let contents = read_small(&path)?;
    parse_stat_start_time(&contents).map_err(|source| AttestationError::ParseProc { path, source })
}

/// `readlink <proc_root>/<pid>/exe`: the executable's path in the process's
/// own mount namespace (with ` (deleted)` appended when it was unlinked).
pub fn read_exe_link(proc_root: &Path, pid: i32) -> Result<PathBuf, AttestationError> {
    let path = pid_path(proc_root, pid, "exe");
    std::fs::read_link(&path).map_err(|source| AttestationError::ReadProc { path, source })
}

/// `stat <proc_root>/<pid>/exe`: the key of the file the process runs,
/// without opening it.
pub fn stat_exe(proc_root: &Path, pid: i32) -> Result<FileKey, AttestationError> {
    let path = pid_path(proc_root, pid, "exe");
    match std::fs::metadata(&path) {
        Ok(meta) => Ok(FileKey::of(&meta)),
        Err(source) => Err(AttestationError::ReadProc { path, source }),
    }
}

/// Opens the executable itself through `<proc_root>/<pid>/exe`, which works
/// across mount namespaces and refers to the file the process runs even if
/// its path has since been replaced.
pub fn open_exe(proc_root: &Path, pid: i32) -> Result<(PathBuf, File), AttestationError> {
    let path = pid_path(proc_root, pid, "exe");
    match File::open(&path) {
        Ok(file) => Ok((path, file)),
        Err(source) => Err(AttestationError::ReadProc { path, source }),
    }
}

/// The key of an open file (`fstat`); `path` names it in errors.
pub fn key_of_open(path: &Path, file: &File) -> Result<FileKey, AttestationError> {
    match file.metadata() {
        Ok(meta) => Ok(FileKey::of(&meta)),
        Err(source) => Err(AttestationError::ReadProc {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_small(path: &Path) -> Result<Vec<u8>, AttestationError> {
    let read = || -> io::Result<Vec<u8>> {
        // Room for the whole file up front: one read returns it (procfs
        // renders a file at its first read) and one more sees the end,
        // with no small probing reads.
        let mut contents = Vec::with_capacity(PROC_READ_CAPACITY);
        File::open(path)?
            .take(MAX_PROC_FILE_LEN)
            .read_to_end(&mut contents)?;
        Ok(contents)
    };
    read().map_err(|source| AttestationError::ReadProc {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tbash\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\n\
        Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nFDSize:\t256\n\
        Groups:\t4 24 27 \nNStgid:\t42\n";

    #[test]
    fn status_table() {
        type Case = (&'static str, String, Result<ProcStatus, ProcfsError>);
        let ok = |euid, egid, groups: &[u32]| {
            Ok(ProcStatus {
                euid,
                egid,
                groups: groups.to_vec(),
            })
        };
        let cases: Vec<Case> = vec![
            ("typical", STATUS.into(), ok(1001, 101, &[4, 24, 27])),
            (
                "no groups",
                STATUS.replace("Groups:\t4 24 27 ", "Groups:\t"),
                ok(1001, 101, &[]),
            ),
            (
                "no trailing newline",
                "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t0".into(),
                ok(0, 0, &[0]),
            ),
            (
                "max ids",
                "Uid:\t1\t4294967295\t1\t1\nGid:\t1\t4294967294\t1\t1\nGroups:\t4294967295\n"
                    .into(),
                ok(u32::MAX, u32::MAX - 1, &[u32::MAX]),
            ),
            (
                "hostile name with an escaped newline is harmless",
                STATUS.replace("Name:\tbash", "Name:\tx\\nUid:\\t0\\t0\\t0\\t0"),
                ok(1001, 101, &[4, 24, 27]),
            ),
            (
                "injected Uid line",
                format!("Name:\tx\nUid:\t0\t0\t0\t0\n{STATUS}"),
                Err(ProcfsError::DuplicateLine("Uid:")),
            ),
            (
                "duplicate Groups",
                format!("{STATUS}Groups:\t0\n"),
                Err(ProcfsError::DuplicateLine("Groups:")),
            ),
            (
                "missing Uid",
                STATUS.replace("Uid:", "Xid:"),
                Err(ProcfsError::MissingLine("Uid:")),
            ),
            (
                "missing Gid",
                STATUS.replace("Gid:", "Xid:"),
                Err(ProcfsError::MissingLine("Gid:")),
            ),
            (
                "missing Groups",
                STATUS.replace("Groups:", "Xroups:"),
                Err(ProcfsError::MissingLine("Groups:")),
            ),
            (
                "three uids",
                STATUS.replace("\t1003", ""),
                Err(ProcfsError::MalformedLine("Uid:")),
            ),
            (
                "negative uid",
                STATUS.replace("\t1001", "\t-1"),
                Err(ProcfsError::MalformedLine("Uid:")),
            ),
            (
                "uid overflow",
                STATUS.replace("\t1001", "\t4294967296"),
                Err(ProcfsError::MalformedLine("Uid:")),
            ),
            (
                "garbage gid",
                STATUS.replace("\t101", "\t1o1"),
                Err(ProcfsError::MalformedLine("Gid:")),
            ),
            (
                "garbage group",
                STATUS.replace("24", "+24"),
                Err(ProcfsError::MalformedLine("Groups:")),
            ),
            (
                "empty",
                String::new(),
                Err(ProcfsError::MissingLine("Uid:")),
            ),
            (
                "binary",
                String::from_utf8_lossy(&[0xff, 0xfe, 0x00, b'\n']).into_owned(),
                Err(ProcfsError::MissingLine("Uid:")),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_status(input.as_bytes()), want, "{name}");
        }
    }

    #[test]
    fn status_non_utf8_name_is_ignored() {
        let mut input = b"Name:\t\xff\xfe)\n".to_vec();
        input.extend_from_slice(STATUS.as_bytes());
        assert_eq!(parse_status(&input).map(|s| s.euid), Ok(1001));
    }

    /// Fields 3..=21 of a real stat line, then starttime (22) and more.
    const STAT_TAIL: &str =
        "S 1 42 42 0 -1 4194560 1234 0 0 0 5 6 0 0 20 0 1 0 987654 12345678 300";

    #[test]
    fn stat_table() {
        let cases: Vec<(&str, Vec<u8>, Result<u64, ProcfsError>)> = vec![
            (
                "plain",
                format!("42 (bash) {STAT_TAIL}\n").into(),
                Ok(987_654),
            ),
            (
                "spaces in name",
                format!("42 (a b c) {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "parens in name",
                format!("42 (a) b (c) {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "name mimicking fields",
                format!("42 (x) S 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 7) {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "empty name",
                format!("42 () {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "name is ')'",
                format!("42 ()) {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "newline in name",
                format!("42 (a\nb) {STAT_TAIL}").into(),
                Ok(987_654),
            ),
            (
                "non-utf8 name",
                [b"42 (\xff\xfe) ".as_slice(), STAT_TAIL.as_bytes()].concat(),
                Ok(987_654),
            ),
            (
                "no closing paren",
                b"42 (bash S 1 2 3".to_vec(),
                Err(ProcfsError::MissingCommEnd),
            ),
            ("empty", Vec::new(), Err(ProcfsError::MissingCommEnd)),
            (
                "ends at paren",
                b"42 (bash)".to_vec(),
                Err(ProcfsError::MissingStartTime),
            ),
            (
                "truncated",
                b"42 (bash) S 1 42 42 0 -1 4194560 1234 0 0 0 5 6 0 0 20 0 1 0".to_vec(),
                Err(ProcfsError::MissingStartTime),
            ),
            (
                "paren inside the numbers hides them",
                format!("42 (bash) {STAT_TAIL} )").into(),
                Err(ProcfsError::MissingStartTime),
            ),
            (
                "garbage start time",
                format!("42 (bash) {}", STAT_TAIL.replace("987654", "98x654")).into(),
                Err(ProcfsError::MalformedStartTime),
            ),
            (
                "negative start time",
                format!("42 (bash) {}", STAT_TAIL.replace("987654", "-987654")).into(),
                Err(ProcfsError::MalformedStartTime),
            ),
            (
                "overflowing start time",
                format!(
                    "42 (bash) {}",
                    STAT_TAIL.replace("987654", "99999999999999999999")
                )
                .into(),
                Err(ProcfsError::MalformedStartTime),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_stat_start_time(&input), want, "{name}");
        }
    }

    #[test]
    fn parsers_never_panic_on_prefixes() {
        // Every truncation of a valid file either parses or is refused.
        let stat = format!("42 (a) b) {STAT_TAIL}");
        for end in 0..=stat.len() {
            let _ = parse_stat_start_time(&stat.as_bytes()[..end]);
        }
        for end in 0..=STATUS.len() {
            let _ = parse_status(&STATUS.as_bytes()[..end]);
        }
    }

    #[test]
    fn same_file_follows_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        std::fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        let opened = key_of_open(&path, &file).unwrap();
        let now = || FileKey::of(&std::fs::metadata(&path).unwrap());
        assert!(opened.same_file(&now()));
        let other = dir.path().join("other");
        std::fs::write(&other, b"two").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(!opened.same_file(&now()));
    }

    #[test]
    fn reads_this_process() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let status = StatusFile::open(Path::new("/proc"), pid)
            .and_then(|file| file.read())
            .unwrap();
        assert_eq!(status.euid, nix::unistd::geteuid().as_raw());
        assert_eq!(status.egid, nix::unistd::getegid().as_raw());
        let start = read_start_time(Path::new("/proc"), pid).unwrap();
        assert_eq!(read_start_time(Path::new("/proc"), pid).unwrap(), start);
        assert!(matches!(
            StatusFile::open(Path::new("/nonexistent-proc"), pid),
            Err(AttestationError::ReadProc { .. })
        ));
    }

    /// An open `status` re-reads the process it was opened for, and once
    /// that process is gone it fails rather than describe another.
    #[test]
    fn an_open_status_reads_its_process_until_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let pid = i32::try_from(child.id()).expect("a pid fits");
        let file = StatusFile::open(Path::new("/proc"), pid).expect("its status opens");
        let first = file.read().expect("a live process's status reads");
        assert_eq!(first.euid, nix::unistd::geteuid().as_raw());
        assert_eq!(file.read().expect("and reads again"), first);
        child.kill().expect("sleep is killed");
        child.wait().expect("and reaped");
        assert!(file.read().is_err(), "a reaped process's status is gone");
    }
}
