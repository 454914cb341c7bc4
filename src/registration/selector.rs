//! Selectors: the `type:key:value` facts attestation produces and entries require.
//!
//! The string form is SPIRE's (`unix:uid:1000`, `k8s:ns:agents`), byte for byte,
//! so registration entries written for spire-agent keep working. This module is
//! the one vocabulary both sides share: attestors produce [`Selector`]s, entries
//! are parsed into them, and matching compares them.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest selector accepted, in bytes (type, key and value together).
pub const MAX_SELECTOR_LEN: usize = 1024;

/// The attestor a selector comes from. A closed set: attestors are not plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorType {
    /// Facts from the kernel about the calling process (peer credentials, /proc).
    Unix,
    /// Facts from the kubelet about the calling process's pod.
    K8s,
}

/// The keys the unix attestor produces; an entry naming any other is a typo.
pub const UNIX_KEYS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "supplementary_gid",
    "supplementary_group",
    "path",
    "sha256",
];

/// The keys the Kubernetes attestor produces.
pub const K8S_KEYS: &[&str] = &[
    "ns",
    "sa",
    "pod-name",
    "pod-uid",
    "pod-label",
    "pod-owner",
    "pod-owner-uid",
    "pod-image",
    "pod-image-count",
    "pod-init-image",
    "pod-init-image-count",
    "container-name",
    "container-image",
    "node-name",
];

/// One attested fact: `unix:uid:1000` is type `unix`, value `uid:1000`.
///
/// Ordering is by type then value, so a [`SelectorSet`] prints and compares
/// deterministically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: SelectorType,
    value: String,
}

/// The selectors of one caller, or the selectors one entry requires.
pub type SelectorSet = BTreeSet<Selector>;

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Nothing before the first `:`, or no `:` at all.
    #[error("selector {0:?} has no type: expected TYPE:KEY:VALUE such as unix:uid:1000")]
    MissingType(String),
    /// The type is not one tether attests.
    #[error("selector {0:?} has unknown type {1:?}: expected unix or k8s")]
    UnknownType(String, String),
    /// The key is not one the attestor produces.
    #[error("selector {selector:?} has unknown key {key:?}; {kind} selectors are: {known}")]
    UnknownKey {
        /// The whole selector as given.
        selector: String,
        /// The type (`unix`, `k8s`).
        kind: &'static str,
        /// The key that was not recognised.
        key: String,
        /// The keys this type knows, comma separated.
        known: String,
    },
    /// `TYPE:KEY` with nothing after it.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    /// The value does not fit the key (a uid that is not a number, say).
    #[error("selector {selector:?}: {problem}")]
    BadValue {
        /// The whole selector as given.
        selector: String,
        /// What is wrong with the value.
        problem: &'static str,
    },
    /// Longer than [`MAX_SELECTOR_LEN`].
    #[error("selector is {0} bytes long; the limit is {MAX_SELECTOR_LEN}")]
    TooLong(usize),
}

// === impl SelectorType ===

impl SelectorType {
    /// The prefix as written in selectors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::K8s => "k8s",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Unix => UNIX_KEYS,
            Self::K8s => K8S_KEYS,
        }
    }
}

impl fmt::Display for SelectorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Selector ===

impl Selector {
    /// A selector produced by an attestor from a fact it read itself.
    ///
    /// `key` must be one of the type's keys; attestors call this with
    /// constants, so it is not validated again here.
    pub fn new(kind: SelectorType, key: &str, value: impl fmt::Display) -> Self {
        Self {
            kind,
            value: format!("{key}:{value}"),
        }
    }

    /// The attestor this selector belongs to.
    pub fn kind(&self) -> SelectorType {
        self.kind
    }

    /// Everything after the type: `uid:1000` for `unix:uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The key part: `uid` for `unix:uid:1000`.
    pub fn key(&self) -> &str {
        self.value.split_once(':').map_or(&self.value, |(k, _)| k)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong(s.len()));
        }
        let (kind, rest) = match s.split_once(':') {
            Some((kind, rest)) if !kind.is_empty() => (kind, rest),
            _ => return Err(SelectorError::MissingType(s.to_owned())),
        };
        let kind = match kind {
            "unix" => SelectorType::Unix,
            "k8s" => SelectorType::K8s,
            other => return Err(SelectorError::UnknownType(s.to_owned(), other.to_owned())),
        };
        let (key, value) = rest.split_once(':').unwrap_or((rest, ""));
        if !kind.keys().contains(&key) {
            return Err(SelectorError::UnknownKey {
                selector: s.to_owned(),
                kind: kind.as_str(),
                key: key.to_owned(),
                known: kind.keys().join(", "),
            });
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(s.to_owned()));
        }
        check_value(kind, key, value).map_err(|problem| SelectorError::BadValue {
            selector: s.to_owned(),
            problem,
        })?;
        Ok(Self {
            kind,
            value: rest.to_owned(),
        })
    }
}

/// Values with a fixed shape are checked so a typo cannot silently never match.
fn check_value(kind: SelectorType, key: &str, value: &str) -> Result<(), &'static str> {
    match (kind, key) {
        (SelectorType::Unix, "uid" | "gid" | "supplementary_gid") => value
            .parse::<u32>()
            .map(drop)
            .map_err(|_| "the value must be a decimal number"),
        (SelectorType::Unix, "sha256") => {
            if value.len() == 64
                && value
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                Ok(())
            } else {
                Err("the value must be 64 lowercase hex digits")
            }
        }
        (SelectorType::Unix, "path") if !value.starts_with('/') => {
            Err("the value must be an absolute path")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for s in [
            "unix:uid:1000",
            "unix:path:/usr/bin/python3",
            "unix:sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "k8s:ns:agents",
            "k8s:pod-label:app:planner",
            "unix:user:some:name",
        ] {
            let sel: Selector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
        }
        let sel: Selector = "k8s:pod-label:app:planner".parse().unwrap();
        assert_eq!(sel.kind(), SelectorType::K8s);
        assert_eq!(sel.key(), "pod-label");
        assert_eq!(sel.value(), "pod-label:app:planner");
    }

    #[test]
    fn refuses_malformed() {
        type Check = fn(&SelectorError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("uid:1000", |e| matches!(e, SelectorError::UnknownType(..))),
            (":uid:1000", |e| matches!(e, SelectorError::MissingType(_))),
            ("nocolon", |e| matches!(e, SelectorError::MissingType(_))),
            ("docker:label:a:b", |e| {
                matches!(e, SelectorError::UnknownType(..))
            }),
            ("unix:ui:1000", |e| {
                matches!(e, SelectorError::UnknownKey { .. })
            }),
            ("unix:uid", |e| matches!(e, SelectorError::EmptyValue(_))),
            ("unix:uid:", |e| matches!(e, SelectorError::EmptyValue(_))),
            ("unix:uid:abc", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:uid:-1", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:sha256:ABC", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:path:relative/bin", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
        ];
        for (input, check) in cases {
            let err = input.parse::<Selector>().unwrap_err();
            assert!(check(&err), "{input}: unexpected {err:?}");
        }
        let long = format!("unix:user:{}", "a".repeat(MAX_SELECTOR_LEN));
        assert!(matches!(
            long.parse::<Selector>(),
            Err(SelectorError::TooLong(_))
        ));
    }

    #[test]
    fn constructed_selector_matches_parsed() {
        let made = Selector::new(SelectorType::Unix, "uid", 1000);
        assert_eq!(made, "unix:uid:1000".parse().unwrap());
    }
}
