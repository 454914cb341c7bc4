//! Reading records back: [`read`] for what is there, [`AuditReader`] to
//! keep following a live trail (`tether audit tail --follow`).
//!
//! Reading checks that each line is a record, not the chain: that is
//! [`verify`](super::verify)'s job. Memory stays bounded by one line (and
//! what the caller keeps), whatever the trail's size.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::event::AuditRecord;
use super::files::{Item, LineReader, list_segments, open_read};
use super::{AuditError, io_error};

/// Which records to return. Every set field must match; the default
/// matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadFilter {
    /// Records of this task.
    pub task_id: Option<String>,
    /// Records with this SPIFFE ID as the subject or among the actors.
    pub spiffe_id: Option<String>,
    /// Records recorded at or after this time.
    pub since: Option<OffsetDateTime>,
}

/// Follows a trail file by file, line by line. [`AuditReader::next_record`]
/// returns `None` at the current end; call it again later to get what was
/// written meanwhile, across new files too.
#[derive(Debug)]
pub struct AuditReader {
    dir: PathBuf,
    filter: ReadFilter,
    current: Option<Cursor>,
}

/// The segment being read.
#[derive(Debug)]
struct Cursor {
    number: u32,
    path: PathBuf,
    reader: LineReader,
    /// A later segment exists: this one is complete once read to its end.
    next: Option<(u32, PathBuf)>,
}

/// Every record in `dir` that `filter` matches, in order. Stops at the
/// first line that is not a record ([`AuditError::Broken`]); an incomplete
/// last line (a write in progress) is not returned.
pub fn read(dir: &Path, filter: &ReadFilter) -> Result<Vec<AuditRecord>, AuditError> {
    let mut reader = AuditReader::new(dir, filter.clone());
    let mut records = Vec::new();
    while let Some(record) = reader.next_record()? {
        records.push(record);
    }
    Ok(records)
}

// === impl ReadFilter ===

impl ReadFilter {
    /// Whether `record` passes.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let event = &record.event;
        self.task_id
            .as_ref()
            .is_none_or(|task| event.task_id.as_ref() == Some(task))
            && self
                .spiffe_id
                .as_ref()
                .is_none_or(|id| event.spiffe_id.as_ref() == Some(id) || event.actors.contains(id))
            && self.since.is_none_or(|since| record.time >= since)
    }
}

// === impl AuditReader ===

impl AuditReader {
    /// A reader at the start of the trail in `dir` (nothing is opened yet).
    pub fn new(dir: &Path, filter: ReadFilter) -> Self {
        Self {
            dir: dir.to_owned(),
            filter,
            current: None,
        }
    }

    /// The next matching record written so far, or `None` at the current
    /// end. An `Err` names a line that is not a record (or an I/O error);
    /// the reader has moved past that line, so calling again continues.
    pub fn next_record(&mut self) -> Result<Option<AuditRecord>, AuditError> {
        loop {
            let Some(cursor) = self.current.as_mut() else {
                let segments = list_segments(&self.dir).map_err(io_error(&self.dir))?;
                let Some((number, path)) = segments.into_iter().next() else {
                    return Ok(None);
                };
                self.current = Some(Cursor::open(number, path)?);
                continue;
            };
            match cursor.reader.next_item().map_err(io_error(&cursor.path))? {
                Some(Item::Line(bytes)) => {
                    let record = AuditRecord::parse(&bytes).map_err(|problem| {
                        cursor.broken(
                            cursor.reader.line_number(),
                            format!("not an audit record: {problem}"),
                        )
                    })?;
                    if self.filter.matches(&record) {
                        return Ok(Some(record));
                    }
                }
                Some(Item::TooLong(len)) => {
                    return Err(cursor.broken(
                        cursor.reader.line_number(),
                        format!("the line is {len} bytes, longer than any record (64 KiB)"),
                    ));
                }
                None => {
                    let Some((number, path)) = cursor.next.take() else {
                        // The writer completes a segment before it creates
                        // the next: if one exists now, read this one to its
                        // end once more, then move on.
                        let segments = list_segments(&self.dir).map_err(io_error(&self.dir))?;
                        let later = segments.into_iter().find(|(n, _)| *n > cursor.number);
                        match later {
                            Some(next) => cursor.next = Some(next),
                            None => return Ok(None),
                        }
                        continue;
                    };
                    let fragment = cursor.reader.fragment_len();
                    let incomplete = cursor.broken(
                        cursor.reader.line_number() + 1,
                        format!(
                            "the file ends with an incomplete line ({fragment} bytes, no newline)"
                        ),
                    );
                    match Cursor::open(number, path.clone()) {
                        Ok(next) => self.current = Some(next),
                        Err(error) => {
                            cursor.next = Some((number, path));
                            return Err(error);
                        }
                    }
                    if fragment > 0 {
                        return Err(incomplete);
                    }
                }
            }
        }
    }
}

// === impl Cursor ===

impl Cursor {
    fn open(number: u32, path: PathBuf) -> Result<Self, AuditError> {
        let file = open_read(&path).map_err(io_error(&path))?;
        Ok(Self {
            number,
            path,
            reader: LineReader::new(file),
            next: None,
        })
    }

    fn broken(&self, line: u64, problem: String) -> AuditError {
        AuditError::Broken {
            file: self.path.clone(),
            line,
            problem,
        }
    }
}
