//! The readable form's vocabulary, shared by every printed thing: aligned
//! tables, coarse relative times, plurals, lists, and the two escapes that
//! keep hostile strings harmless ([`printable`] for what the agent sent,
//! [`field_value`] for caller values in a `key=value` line).

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use time::OffsetDateTime;

use super::{Timestamp, Ttl};

/// Aligned columns, two spaces apart; the last column is not padded.
/// Cells must already be printable.
pub(crate) fn table(
    w: &mut String,
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> fmt::Result {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> fmt::Result {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        writeln!(w, "{}", text.trim_end())
    };
    line(&mut header.iter().copied())?;
    for row in &rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

pub(crate) fn ttl(ttl: Option<Ttl>) -> String {
    ttl.map_or_else(|| "default".to_owned(), |t| t.to_string())
}

pub(crate) fn when(at: Option<Timestamp>, now: OffsetDateTime) -> String {
    at.map_or_else(
        || "(unknown)".to_owned(),
        |at| format!("{at} ({})", relative(at.0, now)),
    )
}

/// Several values in one table cell.
pub(crate) fn cells(items: &[String]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(|s| printable(s))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        printable(s).into_owned()
    }
}

pub(crate) fn or_none(s: &str) -> Cow<'_, str> {
    if s.is_empty() {
        Cow::Borrowed("(none)")
    } else {
        printable(s)
    }
}

/// "in 59m", "3h 5m ago": coarse, because the exact instant is printed
/// beside it.
pub(crate) fn relative(then: OffsetDateTime, now: OffsetDateTime) -> String {
    let seconds = (then - now).whole_seconds();
    let span = coarse(seconds.unsigned_abs());
    if seconds >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

pub(crate) fn coarse(seconds: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let pair = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    match seconds {
        s if s < MINUTE => format!("{s}s"),
        s if s < HOUR => format!("{}m", s / MINUTE),
        s if s < DAY => pair(s / HOUR, "h", s % HOUR / MINUTE, "m"),
        s => pair(s / DAY, "d", s % DAY / HOUR, "h"),
    }
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub(crate) fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    items
        .iter()
        .map(|s| printable(s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A caller-chosen value in a `key=value` line: as it is when it cannot be
/// mistaken for more fields, else quoted and escaped (Debug), so a space,
/// an `=`, a quote (or, in a list, a comma) cannot forge a field.
pub(crate) fn field_value(s: &str, in_list: bool) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && !s.chars().any(|c| {
            c.is_control() || c.is_whitespace() || c == '=' || c == '"' || (in_list && c == ',')
        });
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{s:?}"))
    }
}

/// `s` with control characters escaped, so a hostile agent cannot drive
/// the terminal.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}
