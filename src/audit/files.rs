//! The directory layout: segment file names, the chain hash, the `HEAD`
//! file, and a bounded line reader that the writer's recovery, `verify`
//! and `read` share.
//!
//! Every file here is opened with `O_NOFOLLOW`: a segment or `HEAD`
//! swapped for a symlink is refused, never followed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use super::seal::{Seal, SigningKey, head_message};
use super::{AuditError, io_error};

/// Longest record line, in bytes, without its newline. Longer lines are
/// never written and are reported when read.
pub const MAX_LINE: usize = 64 * 1024;

/// The file naming the last durable record.
pub(super) const HEAD_FILE: &str = "HEAD";
/// The lock one writer holds on the directory.
pub(super) const LOCK_FILE: &str = "audit.lock";
/// Where `HEAD` is written before it is renamed into place.
pub(super) const HEAD_TMP_FILE: &str = ".HEAD.tmp";
/// Largest `HEAD` file read: it is one short JSON line.
const MAX_HEAD_LEN: u64 = 4096;
/// Bytes read per `read(2)` by [`LineReader`].
const CHUNK: usize = 64 * 1024;

const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// A SHA-256 digest: of a record's line, or 64 zeros before the first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Hash([u8; 32]);

/// A point in the chain: a record's `seq` and the hash of its line.
/// `seq` 0 with [`Hash::ZERO`] is the empty chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub seq: u64,
    pub hash: Hash,
}

/// A well-formed `HEAD` file: the point it names and, unless an older
/// tether wrote it, the agent's seal over that point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HeadFile {
    pub head: Head,
    pub sealed: Option<SealedAt>,
}

/// `HEAD`'s seal and the time it was made (part of what is signed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SealedAt {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub seal: Seal,
}

/// What the `HEAD` file holds, read without trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HeadState {
    /// No `HEAD` file.
    Missing,
    /// A well-formed `HEAD` (its seal not checked yet).
    Valid(HeadFile),
    /// A `HEAD` that is not what tether writes; the reason.
    Damaged(String),
}

/// `HEAD` on disk: `{"seq":N,"hash":"<64 hex>","time":"…","seal":{"key":…,"sig":…}}`
/// and a newline. `time` and `seal` are absent in a `HEAD` written before
/// seals (they are then both absent).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadDocument {
    seq: u64,
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<Seal>,
}

/// One item of [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Item {
    /// A complete line, without its newline.
    Line(Vec<u8>),
    /// A complete line longer than [`MAX_LINE`] (skipped, not buffered).
    TooLong(u64),
}

/// Reads newline-terminated lines with bounded memory. At the current end
/// of the file it returns `None` and keeps an incomplete last line
/// buffered, so a later call continues once the rest is written (`tail
/// --follow`).
#[derive(Debug)]
pub(super) struct LineReader {
    file: File,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// `buf[start..scanned]` holds no newline.
    scanned: usize,
    /// Bytes of the current line already dropped because it is too long.
    skipped: u64,
    /// Complete lines returned so far.
    lines: u64,
    /// File offset just past the last complete line.
    consumed: u64,
}

// === impl Hash ===

impl Hash {
    /// The `prev` of the first record.
    pub const ZERO: Hash = Hash([0; 32]);

    /// SHA-256 of a record's line (without its newline).
    pub fn of(line: &[u8]) -> Hash {
        let digest = digest::digest(&digest::SHA256, line);
        let mut out = [0; 32];
        out.copy_from_slice(digest.as_ref());
        Hash(out)
    }

    /// Lowercase hex, exactly 64 characters.
    pub fn parse(hex: &str) -> Option<Hash> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Hash(out))
    }
}

impl Hash {
    /// The lowercase hex of the digest, without a formatter per byte (it
    /// is in every record's envelope).
    pub fn to_hex(self) -> [u8; 64] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
        hex
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ASCII hex digits only: always UTF-8.
        f.write_str(std::str::from_utf8(&self.to_hex()).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

// === impl Head ===

impl Head {
    /// The empty chain: no record yet.
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: Hash::ZERO,
    };
}

// === impl LineReader ===

impl LineReader {
    pub fn new(file: File) -> Self {
        Self {
            file,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            skipped: 0,
            lines: 0,
            consumed: 0,
        }
    }

    /// The next complete line, or `None` at the current end of the file.
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                let len = self.skipped + (end - self.start) as u64;
                let item = if len > MAX_LINE as u64 {
                    Item::TooLong(len)
                } else {
                    Item::Line(self.buf[self.start..end].to_vec())
                };
                self.lines += 1;
                self.consumed += len + 1;
                self.skipped = 0;
                self.start = end + 1;
                self.scanned = self.start;
                return Ok(Some(item));
            }
            self.scanned = self.buf.len();
            if self.buf.len() - self.start > MAX_LINE {
                // Too long to be a record: count it, do not keep it.
                self.skipped += (self.buf.len() - self.start) as u64;
                self.buf.clear();
                self.start = 0;
                self.scanned = 0;
            } else if self.start > 0 {
                self.buf.drain(..self.start);
                self.scanned -= self.start;
                self.start = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + CHUNK, 0);
            let read = loop {
                match self.file.read(&mut self.buf[old..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            };
            self.buf.truncate(old + n);
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// The number of the line last returned (from 1).
    pub fn line_number(&self) -> u64 {
        self.lines
    }

    /// The file offset just past the last complete line.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Bytes read past the last complete line: an incomplete last line.
    pub fn fragment_len(&self) -> u64 {
        self.skipped + (self.buf.len() - self.start) as u64
    }
}

/// `audit-000042.jsonl`.
pub(super) fn segment_name(number: u32) -> String {
    format!("{SEGMENT_PREFIX}{number:06}{SEGMENT_SUFFIX}")
}

/// The number in a segment's name; `None` for any other name (including
/// non-canonical spellings such as `audit-0000042.jsonl`).
pub(super) fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = digits.parse().ok()?;
    (number > 0 && segment_name(number) == name).then_some(number)
}

/// The segments in `dir`, by number.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(number) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((number, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(number, _)| *number);
    Ok(segments)
}

/// Opens a file for reading without following a symlink.
pub(super) fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Reads `dir/HEAD`. I/O errors other than absence are errors; content
/// that is not a `HEAD` is [`HeadState::Damaged`].
pub(super) fn read_head(dir: &Path) -> io::Result<HeadState> {
    let file = match open_read(&dir.join(HEAD_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HeadState::Missing),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Ok(HeadState::Damaged("is a symlink".into()));
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(HeadState::Damaged("is not a regular file".into()));
    }
    let mut text = String::new();
    if file
        .take(MAX_HEAD_LEN + 1)
        .read_to_string(&mut text)
        .is_err()
    {
        return Ok(HeadState::Damaged("is not UTF-8 text".into()));
    }
    if text.len() as u64 > MAX_HEAD_LEN {
        return Ok(HeadState::Damaged(format!(
            "is longer than {MAX_HEAD_LEN} bytes"
        )));
    }
    let Some(line) = text.strip_suffix('\n') else {
        return Ok(HeadState::Damaged("does not end with a newline".into()));
    };
    let document: HeadDocument = match serde_json::from_str(line) {
        Ok(document) => document,
        Err(e) => return Ok(HeadState::Damaged(format!("does not parse: {e}"))),
    };
    let Some(hash) = Hash::parse(&document.hash) else {
        return Ok(HeadState::Damaged(
            "hash is not 64 lowercase hex digits".into(),
        ));
    };
    let sealed = match (document.time, document.seal) {
        (None, None) => None,
        (Some(time), Some(seal)) if seal.is_well_formed() => Some(SealedAt { time, seal }),
        (Some(_), Some(_)) => {
            return Ok(HeadState::Damaged("seal is malformed".into()));
        }
        _ => return Ok(HeadState::Damaged("has a time or a seal, not both".into())),
    };
    Ok(HeadState::Valid(HeadFile {
        head: Head {
            seq: document.seq,
            hash,
        },
        sealed,
    }))
}

/// Replaces `dir/HEAD` atomically: temp file, fsync, rename, fsync the
/// directory. A crash leaves the old `HEAD` or the new one, never a mix.
/// `HEAD` is sealed with `key` at the current time. An error names the
/// path that failed.
pub(super) fn write_head(dir: &Path, head: Head, key: &SigningKey) -> Result<(), AuditError> {
    let tmp = dir.join(HEAD_TMP_FILE);
    let path = dir.join(HEAD_FILE);
    // A leftover from a crash mid-write is ours to replace; anything else
    // in its place (a directory) is an error.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&tmp)(e)),
        _ => {}
    }
    let time = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let seal = key.seal(&head_message(head.seq, &head.hash, &time));
    let document = HeadDocument {
        seq: head.seq,
        hash: head.hash.to_string(),
        time: Some(time),
        seal: Some(seal),
    };
    let mut text = serde_json::to_string(&document)
        .map_err(io::Error::other)
        .map_err(io_error(&tmp))?;
    text.push('\n');
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .map_err(io_error(&tmp))
        .and_then(|()| fs::rename(&tmp, &path).map_err(io_error(&path)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir).map_err(io_error(dir))
}

/// Makes a directory's entries (a new file, a rename) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The `seq` of a line tether wrote (`{"seq":N,...`), read without parsing
/// the rest: recovery uses it to scan a large segment quickly.
pub(super) fn seq_prefix(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || rest[end] != b',' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_in_lowercase_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Hash::of(b"abc").to_string(), hex);
        assert_eq!(Hash::parse(hex), Some(Hash::of(b"abc")));
        assert_eq!(Hash::ZERO.to_string(), "0".repeat(64));
        for bad in [
            "",
            &hex[1..],
            &hex.to_uppercase(),
            &format!("{}g", &hex[1..]),
        ] {
            assert_eq!(Hash::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_names_are_canonical() {
        assert_eq!(segment_name(1), "audit-000001.jsonl");
        assert_eq!(segment_name(1_234_567), "audit-1234567.jsonl");
        assert_eq!(parse_segment_name("audit-000042.jsonl"), Some(42));
        assert_eq!(parse_segment_name("audit-1234567.jsonl"), Some(1_234_567));
        for other in [
            "audit-0000042.jsonl",
            "audit-42.jsonl",
            "audit-000000.jsonl",
            "audit-+00042.jsonl",
            "audit-000042.jsonl.bak",
            "HEAD",
        ] {
            assert_eq!(parse_segment_name(other), None, "{other}");
        }
    }

    #[test]
    fn lines_are_bounded_and_fragments_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let long = vec![b'x'; MAX_LINE + 10];
        let mut content = b"one\n\ntwo\n".to_vec();
        content.extend_from_slice(&long);
        content.extend_from_slice(b"\nthree\npart");
        fs::write(&path, &content).unwrap();

        let mut reader = LineReader::new(open_read(&path).unwrap());
        let mut items = Vec::new();
        while let Some(item) = reader.next_item().unwrap() {
            items.push(item);
        }
        assert_eq!(
            items,
            [
                Item::Line(b"one".to_vec()),
                Item::Line(Vec::new()),
                Item::Line(b"two".to_vec()),
                Item::TooLong(long.len() as u64),
                Item::Line(b"three".to_vec()),
            ]
        );
        assert_eq!(reader.line_number(), 5);
        assert_eq!(reader.fragment_len(), 4);
        assert_eq!(reader.consumed(), content.len() as u64 - 4);

        // The rest of the fragment arrives: the same reader continues.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"ial\n")
            .unwrap();
        assert_eq!(
            reader.next_item().unwrap(),
            Some(Item::Line(b"partial".to_vec()))
        );
        assert_eq!(reader.next_item().unwrap(), None);
        assert_eq!(reader.fragment_len(), 0);
    }

    #[test]
    fn head_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_head(dir.path()).unwrap(), HeadState::Missing);
        let head = Head {
            seq: 7,
            hash: Hash::of(b"x"),
        };
        let (key, _) = SigningKey::generate().unwrap();
        write_head(dir.path(), head, &key).unwrap();
        let HeadState::Valid(file) = read_head(dir.path()).unwrap() else {
            panic!("HEAD not valid");
        };
        assert_eq!(file.head, head);
        let sealed = file.sealed.expect("a sealed HEAD");
        let text = head_message(head.seq, &head.hash, &sealed.time);
        assert_eq!(
            sealed
                .seal
                .check(std::slice::from_ref(key.public_key()), &text),
            Ok(())
        );
        assert!(!dir.path().join(HEAD_TMP_FILE).exists());

        // A HEAD written before seals is still a HEAD.
        fs::write(
            dir.path().join(HEAD_FILE),
            format!("{{\"seq\":7,\"hash\":\"{}\"}}\n", head.hash),
        )
        .unwrap();
        assert_eq!(
            read_head(dir.path()).unwrap(),
            HeadState::Valid(HeadFile { head, sealed: None })
        );

        for (text, want) in [
            ("{\"seq\":1,\"hash\":\"00\"}\n", "hash"),
            ("{\"seq\":1}\n", "does not parse"),
            ("{\"seq\":1,\"hash\":\"x\",\"more\":1}\n", "does not parse"),
            ("", "newline"),
            (
                "{\"seq\":1,\"hash\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"time\":\"t\"}\n",
                "not both",
            ),
            (
                "{\"seq\":1,\"hash\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"time\":\"t\",\"seal\":{\"key\":\"ab\",\"sig\":\"AA\"}}\n",
                "malformed",
            ),
        ] {
            fs::write(dir.path().join(HEAD_FILE), text).unwrap();
            match read_head(dir.path()).unwrap() {
                HeadState::Damaged(problem) => assert!(problem.contains(want), "{problem}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn seq_prefix_reads_only_what_the_writer_writes() {
        assert_eq!(seq_prefix(b"{\"seq\":42,\"time\":\"x\"}"), Some(42));
        assert_eq!(seq_prefix(b"{\"seq\":,"), None);
        assert_eq!(seq_prefix(b"{\"seq\":42}"), None);
        assert_eq!(seq_prefix(b"{ \"seq\":42,"), None);
        assert_eq!(seq_prefix(b"{\"seq\":99999999999999999999999,"), None);
    }
}
