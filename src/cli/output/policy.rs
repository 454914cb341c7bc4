//! What `tether policy` prints: a policy directory's validation and one
//! offline decision.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use serde::Serialize;
use time::OffsetDateTime;

use super::Render;
use super::text::{list, plural, printable};

/// `tether policy validate`: valid or not, what was read and what is
/// wrong.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PolicyValidation {
    /// `valid`: every file parsed and validated against the schema.
    pub(crate) valid: bool,
    /// `files`: `*.cedar` files read (0 when the directory could not be).
    pub(crate) files: usize,
    /// `policies`: policies loaded (0 when invalid).
    pub(crate) policies: usize,
    /// `ids`: their ids, in file order (`@id`, else `FILE:policyN`).
    pub(crate) ids: Vec<String>,
    /// `errors`: what stops the set loading, located.
    pub(crate) errors: Vec<PolicyProblemView>,
    /// `warnings`: what the validator found suspicious (a policy that can
    /// never apply); they do not stop a load.
    pub(crate) warnings: Vec<PolicyProblemView>,
}

/// One located problem in a policy file.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PolicyProblemView {
    /// `file`: the file, as found under the directory given.
    pub(crate) file: PathBuf,
    /// `line`: from 1.
    pub(crate) line: usize,
    /// `column`: from 1, in characters.
    pub(crate) column: usize,
    /// `reason`: what is wrong.
    pub(crate) reason: String,
}

/// `tether policy check`: the decision and the policies behind it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PolicyDecisionView {
    /// `decision`: `"allow"` or `"deny"`.
    pub(crate) decision: &'static str,
    /// `policies`: the ids of the policies that decided (the permits that
    /// matched; or the forbids that matched, or the policies that failed on
    /// the request; empty when nothing permitted it).
    pub(crate) policies: Vec<String>,
    /// `reason`: why it was denied; null when allowed.
    pub(crate) reason: Option<String>,
}

// === impl PolicyValidation ===

impl Render for PolicyValidation {
    /// One line when valid ("N policies in M files: valid"); the problems
    /// themselves go to stderr (see [`PolicyProblemView`]'s Display),
    /// unless `--json`.
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        if self.valid {
            writeln!(
                w,
                "{} polic{} in {} file{}: valid",
                self.policies,
                if self.policies == 1 { "y" } else { "ies" },
                self.files,
                plural(self.files)
            )
        } else {
            writeln!(
                w,
                "invalid: {} problem{}",
                self.errors.len(),
                plural(self.errors.len())
            )
        }
    }
}

// === impl PolicyDecisionView ===

impl Render for PolicyDecisionView {
    /// "allow (policies: a, b)" or "deny: reason (policies: c)".
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        match &self.reason {
            None => write!(w, "{}", self.decision)?,
            Some(reason) => write!(w, "{}: {}", self.decision, printable(reason))?,
        }
        if !self.policies.is_empty() {
            write!(w, " (policies: {})", list(&self.policies))?;
        }
        writeln!(w)
    }
}

// === impl PolicyProblemView ===

impl fmt::Display for PolicyProblemView {
    /// `FILE:LINE:COLUMN: reason`, as compilers print, so editors jump
    /// to it; control characters escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            printable(&self.file.display().to_string()),
            self.line,
            self.column,
            printable(&self.reason)
        )
    }
}
