//! [`verify`]: checks a trail end to end and names the first broken place.
//!
//! Every line must be a record; seqs run from 1 without a gap; each `prev`
//! is the hash of the line before; segments are numbered without a gap;
//! and the trail reaches `HEAD`. A link that does not hold means the
//! record before it or the record itself changed: the next record (or
//! `HEAD`) tells which, so an edit is reported at the edited line.
//!
//! An `audit-recovered` record that reports damage (`deny`: the agent
//! found a cut, an edit, a missing or rewritten `HEAD` when it started)
//! breaks the trail there for good, even where the chain after it holds;
//! one that reports only a crash's leftovers (`info`) is listed.
//!
//! Given the agent's published audit keys, it also checks the seals: the
//! one on `HEAD`, which vouches for every record up to it, and the one on
//! each `audit-recovered` record (see `audit::seal`). Without keys it says
//! who sealed `HEAD`, unchecked.
//!
//! Works on a copy, or beside a running writer: `HEAD` is read first, and
//! the writer moves `HEAD` only after the records it names are written, so
//! everything `HEAD` names is in the files read after it. Records past
//! `HEAD` are a batch not yet synced; an incomplete line after them is a
//! write in progress (or torn by a crash, which the next start cuts).

use std::path::{Path, PathBuf};

use super::event::{AuditRecord, EventKind, Outcome};
use super::files::{
    HEAD_FILE, Hash, Head, HeadState, Item, LineReader, list_segments, open_read, read_head,
    segment_name,
};
use super::seal::{PublicKey, head_message, recovery_message};
use super::{AuditError, io_error};

/// What [`verify`] found in an intact trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Segment files read.
    pub files: usize,
    /// The seq `HEAD` names (0 for an empty trail).
    pub head_seq: u64,
    /// The hash `HEAD` names, lowercase hex.
    pub head_hash: String,
    /// The last record's seq: more than `head_seq` while a writer has
    /// records not yet synced.
    pub last_seq: u64,
    /// The newest file ends with an incomplete line past `HEAD`: a write in
    /// progress, or one torn by a crash (cut at the next start).
    pub partial_tail: bool,
    /// The `audit-recovered` records: each start that found damage or a
    /// crash's leftovers.
    pub recoveries: Vec<Recovery>,
    /// The id of the key whose seal `HEAD` carries, and when it was made;
    /// `None` for a `HEAD` written before seals.
    pub sealed: Option<(String, String)>,
    /// The seals were checked against keys given: `HEAD`'s and every
    /// `audit-recovered` record's hold.
    pub seals_checked: bool,
}

/// An `audit-recovered` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Its file.
    pub file: PathBuf,
    /// Its line.
    pub line: u64,
    /// Its seq.
    pub seq: u64,
    /// What the writer found and did.
    pub reason: String,
}

/// A record's place.
#[derive(Debug, Clone)]
struct Place {
    file: PathBuf,
    line: u64,
    seq: u64,
    hash: Hash,
}

/// A link that did not hold: `before`'s hash is not `after`'s `prev`.
#[derive(Debug)]
struct Suspect {
    before: Place,
    after: Place,
}

struct Verifier<'k> {
    head: Option<Head>,
    /// The published keys to check seals with; empty: not checked.
    keys: &'k [PublicKey],
    expected_seq: u64,
    last: Option<Place>,
    suspect: Option<Suspect>,
    /// The record with `HEAD`'s seq.
    at_head: Option<Place>,
    records: u64,
    recoveries: Vec<Recovery>,
    /// The first `audit-recovered` record that reports damage (a `deny`):
    /// the agent found the trail broken when it started.
    damage: Option<(Place, String)>,
}

/// Checks the trail in `dir`: `Ok` with what was checked, or
/// [`AuditError::Broken`] at the first broken, edited, reordered or
/// missing record (or damaged `HEAD`). With `keys` (the agent's published
/// audit keys), a `HEAD` or an `audit-recovered` record whose seal is
/// missing or does not hold is broken too. Other errors are I/O.
pub fn verify(dir: &Path, keys: &[PublicKey]) -> Result<VerifyReport, AuditError> {
    let head_path = dir.join(HEAD_FILE);
    let head_state = read_head(dir).map_err(io_error(&head_path))?;
    let segments = list_segments(dir).map_err(io_error(dir))?;
    let mut verifier = Verifier {
        head: match &head_state {
            HeadState::Valid(file) => Some(file.head),
            _ => None,
        },
        keys,
        expected_seq: 1,
        last: None,
        suspect: None,
        at_head: None,
        records: 0,
        recoveries: Vec::new(),
        damage: None,
    };

    let mut partial_tail = false;
    let mut expected_number = 1;
    for (i, (number, path)) in segments.iter().enumerate() {
        if *number != expected_number {
            let after = match &verifier.last {
                Some(last) => format!(" (the records after seq {})", last.seq),
                None => " (the first records)".to_owned(),
            };
            let missing = if number - expected_number == 1 {
                format!("{} is missing", segment_name(expected_number))
            } else {
                format!(
                    "{} to {} are missing",
                    segment_name(expected_number),
                    segment_name(number - 1)
                )
            };
            return Err(verifier.first_of(broken(path, 1, format!("{missing}{after}"))));
        }
        expected_number = number.saturating_add(1);
        let mut reader = LineReader::new(open_read(path).map_err(io_error(path))?);
        while let Some(item) = reader.next_item().map_err(io_error(path))? {
            verifier.line(path, reader.line_number(), item)?;
        }
        let fragment = reader.fragment_len();
        if fragment > 0 {
            let newest = i + 1 == segments.len();
            let past_head = verifier
                .head
                .is_some_and(|head| verifier.expected_seq > head.seq);
            if !(newest && past_head) {
                return Err(verifier.first_of(broken(
                    path,
                    reader.line_number() + 1,
                    format!(
                        "the file ends with an incomplete line ({fragment} bytes, no newline): cut mid-write, or damaged"
                    ),
                )));
            }
            partial_tail = true;
        }
    }
    verifier.finish(dir, &head_state, segments.len(), partial_tail)
}

// === impl Verifier ===

impl Verifier<'_> {
    fn line(&mut self, file: &Path, line: u64, item: Item) -> Result<(), AuditError> {
        let bytes = match item {
            Item::Line(bytes) => bytes,
            Item::TooLong(len) => {
                return Err(self.first_of(broken(
                    file,
                    line,
                    format!("the line is {len} bytes, longer than any record (64 KiB)"),
                )));
            }
        };
        let record = match AuditRecord::parse(&bytes) {
            Ok(record) => record,
            Err(problem) => {
                return Err(self.first_of(broken(
                    file,
                    line,
                    format!("not an audit record: {problem}"),
                )));
            }
        };
        let prev = Hash::parse(&record.prev).unwrap_or(Hash::ZERO);
        let place = Place {
            file: file.to_owned(),
            line,
            seq: record.seq,
            hash: Hash::of(&bytes),
        };

        // An earlier broken link: this record's prev says which side of it
        // changed.
        if let Some(suspect) = self.suspect.take() {
            return Err(suspect.resolve(Some(prev)));
        }
        if record.seq != self.expected_seq {
            return Err(broken(file, line, self.seq_problem(record.seq)));
        }
        match &self.last {
            None if prev != Hash::ZERO => {
                return Err(broken(
                    file,
                    line,
                    "the first record's prev is not 64 zeros: it was changed".into(),
                ));
            }
            Some(last) if prev != last.hash => {
                self.suspect = Some(Suspect {
                    before: last.clone(),
                    after: place.clone(),
                });
            }
            _ => {}
        }
        if record.event.event == EventKind::AuditRecovered {
            if !self.keys.is_empty() {
                let reason = record.event.reason.as_deref().unwrap_or_default();
                let problem = match &record.event.seal {
                    None => Some("it is not sealed".to_owned()),
                    Some(seal) => seal
                        .check(
                            self.keys,
                            &recovery_message(
                                record.seq,
                                &prev,
                                record.event.decision.as_str(),
                                reason,
                            ),
                        )
                        .err()
                        .map(|problem| problem.to_string()),
                };
                if let Some(problem) = problem {
                    return Err(self.first_of(broken(
                        file,
                        line,
                        format!(
                            "the audit-recovered record seq {} does not hold: {problem}",
                            record.seq
                        ),
                    )));
                }
            }
            if record.event.decision == Outcome::Deny && self.damage.is_none() {
                self.damage = Some((
                    place.clone(),
                    record.event.reason.clone().unwrap_or_default(),
                ));
            }
            self.recoveries.push(Recovery {
                file: file.to_owned(),
                line,
                seq: record.seq,
                reason: record.event.reason.unwrap_or_default(),
            });
        }
        if self.head.is_some_and(|head| head.seq == record.seq) {
            self.at_head = Some(place.clone());
        }
        self.expected_seq += 1;
        self.records += 1;
        self.last = Some(place);
        Ok(())
    }

    /// `error`, unless a broken link before it is still undecided: that
    /// one comes first in the trail (and nothing after it can decide it).
    fn first_of(&mut self, error: AuditError) -> AuditError {
        match self.suspect.take() {
            Some(suspect) => suspect.resolve(None),
            None => error,
        }
    }

    fn seq_problem(&self, seq: u64) -> String {
        let expected = self.expected_seq;
        if expected == 1 {
            return format!(
                "the trail starts at seq {seq}: {} missing",
                records(1, seq - 1)
            );
        }
        let previous = expected - 1;
        if seq > expected {
            format!(
                "seq {seq} follows seq {previous}: {} missing or out of order",
                records(expected, seq - 1)
            )
        } else {
            format!("seq {seq} follows seq {previous}: records are out of order or repeated")
        }
    }

    fn finish(
        mut self,
        dir: &Path,
        head_state: &HeadState,
        files: usize,
        partial_tail: bool,
    ) -> Result<VerifyReport, AuditError> {
        let head_path = dir.join(HEAD_FILE);
        let (head, sealed) = match head_state {
            HeadState::Valid(file) => (file.head, file.sealed.as_ref()),
            HeadState::Missing if files == 0 => (Head::GENESIS, None),
            HeadState::Missing => {
                return Err(self.first_of(broken(
                    &head_path,
                    1,
                    "HEAD is missing (deleted?): the end of the trail cannot be checked".into(),
                )));
            }
            HeadState::Damaged(problem) => {
                return Err(self.first_of(broken(&head_path, 1, format!("HEAD {problem}"))));
            }
        };
        if let Some(suspect) = self.suspect.take() {
            let commitment = (suspect.after.seq == head.seq).then_some(head.hash);
            return Err(suspect.resolve(commitment));
        }

        let last_seq = self.last.as_ref().map_or(0, |last| last.seq);
        if last_seq < head.seq {
            let (file, line) = match &self.last {
                Some(last) => (last.file.clone(), last.line + 1),
                None => (head_path, 1),
            };
            return Err(broken(
                &file,
                line,
                format!(
                    "the trail ends at seq {last_seq} but HEAD records seq {}: {} missing (the tail was cut)",
                    head.seq,
                    records(last_seq + 1, head.seq)
                ),
            ));
        }
        match &self.at_head {
            Some(place) if place.hash != head.hash => {
                return Err(broken(
                    &place.file,
                    place.line,
                    format!(
                        "record seq {} does not match HEAD: it was changed after it was written (or HEAD was)",
                        place.seq
                    ),
                ));
            }
            None if head.seq == 0 && head.hash != Hash::ZERO => {
                return Err(broken(
                    &head_path,
                    1,
                    "HEAD records seq 0 with a hash other than 64 zeros".into(),
                ));
            }
            _ => {}
        }
        if let Some((place, reason)) = &self.damage {
            return Err(broken(
                &place.file,
                place.line,
                format!(
                    "the agent found the trail damaged when it started (its record seq {}): {reason}",
                    place.seq
                ),
            ));
        }
        if !self.keys.is_empty() {
            let problem = match sealed {
                None => Some("it is not sealed".to_owned()),
                Some(sealed) => sealed
                    .seal
                    .check(self.keys, &head_message(head.seq, &head.hash, &sealed.time))
                    .err()
                    .map(|problem| problem.to_string()),
            };
            if let Some(problem) = problem {
                return Err(broken(
                    &head_path,
                    1,
                    format!("HEAD does not hold: {problem}"),
                ));
            }
        }
        Ok(VerifyReport {
            records: self.records,
            files,
            head_seq: head.seq,
            head_hash: head.hash.to_string(),
            last_seq,
            partial_tail,
            recoveries: self.recoveries,
            sealed: sealed.map(|sealed| (sealed.seal.key.clone(), sealed.time.clone())),
            seals_checked: !self.keys.is_empty(),
        })
    }
}

// === impl Suspect ===

impl Suspect {
    /// `commitment` is what the chain holds for `after`'s line (the next
    /// record's prev, or `HEAD`'s hash), if anything does.
    fn resolve(self, commitment: Option<Hash>) -> AuditError {
        let Suspect { before, after } = self;
        match commitment {
            Some(hash) if hash == after.hash => broken(
                &before.file,
                before.line,
                format!(
                    "record seq {} was changed: its SHA-256 is not the prev of the record after it ({}:{})",
                    before.seq,
                    after.file.display(),
                    after.line
                ),
            ),
            Some(_) => broken(
                &after.file,
                after.line,
                format!(
                    "record seq {} was changed: it matches neither the record before it nor the one after it",
                    after.seq
                ),
            ),
            None => broken(
                &after.file,
                after.line,
                format!(
                    "prev is not the SHA-256 of the record before it ({}:{}): one of the two was changed",
                    before.file.display(),
                    before.line
                ),
            ),
        }
    }
}

fn broken(file: &Path, line: u64, problem: String) -> AuditError {
    AuditError::Broken {
        file: file.to_owned(),
        line,
        problem,
    }
}

/// "record 5 is" / "records 5 to 9 are".
fn records(first: u64, last: u64) -> String {
    if first == last {
        format!("record {first} is")
    } else {
        format!("records {first} to {last} are")
    }
}
