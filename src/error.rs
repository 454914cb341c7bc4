//! How an error is printed: with its whole `source()` chain, once.
//!
//! Every error enum in the crate says what failed in its message and
//! carries the cause as `source()` (never both, so nothing is printed
//! twice). Whoever logs an error or turns it into a status text prints it
//! with [`Chain`], so no level (the OS error at the bottom, say) is
//! dropped.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, `outer: inner: innermost`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

// === impl Chain ===

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `error` and its sources as one line (see [`Chain`]).
pub fn chain(error: &(dyn Error + '_)) -> String {
    Chain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("opening the store")]
        Open(#[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    enum Middle {
        #[error("reading /var/lib/tether/db")]
        Read(#[source] std::io::Error),
    }

    #[test]
    fn every_level_is_printed_once() {
        let error = Outer::Open(Middle::Read(std::io::Error::from_raw_os_error(13)));
        let text = chain(&error);
        assert!(
            text.starts_with("opening the store: reading /var/lib/tether/db: Permission denied"),
            "{text}"
        );
        assert_eq!(text.matches("Permission denied").count(), 1, "{text}");
        assert_eq!(format!("{:?}", Chain(&error)), text);
        // A lone error is just its message.
        assert_eq!(
            chain(&Middle::Read(std::io::Error::other("x"))),
            "reading /var/lib/tether/db: x"
        );
    }
}
