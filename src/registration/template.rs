//! SPIFFE ID templates: `spiffe://example.org/user/{unix:user}` names a
//! whole class of workloads with one entry; each caller's ID is filled in
//! from its own attested selectors.
//!
//! Only single-valued selector keys may be used (a process has one uid, one
//! user, one namespace, but many supplementary groups), and a filled-in
//! value must be a valid SPIFFE path segment. A caller without the value,
//! or with a value that cannot be a path segment, simply does not match:
//! templates never produce an ID the caller's selectors do not support.

use std::fmt;

use spiffe::{SpiffeId, TrustDomain};

use super::entry::{EntryError, MAX_SPIFFE_ID_LEN};
use super::selector::{SelectorSet, SelectorType};

/// Selector keys a template may name: each has one value per process.
pub const TEMPLATE_KEYS: &[&str] = &[
    "unix:uid",
    "unix:gid",
    "unix:user",
    "unix:group",
    "unix:sha256",
    "k8s:ns",
    "k8s:sa",
    "k8s:pod-name",
    "k8s:pod-uid",
    "k8s:node-name",
    "k8s:container-name",
];

/// A SPIFFE ID, possibly with `{type:key}` placeholders in its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    text: String,
    form: Form,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Form {
    Fixed(SpiffeId),
    Templated(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder { kind: SelectorType, key: String },
}

// === impl IdTemplate ===

impl IdTemplate {
    /// Parses and validates `value` as a workload ID (or template) in
    /// `trust_domain`.
    pub fn parse(value: &str, trust_domain: &TrustDomain) -> Result<Self, EntryError> {
        if !value.contains('{') && !value.contains('}') {
            let id = super::entry::parse_workload_id(value, trust_domain)?;
            return Ok(Self {
                text: value.to_owned(),
                form: Form::Fixed(id),
            });
        }
        let authority_end = value
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.find('/'))
            .map_or(value.len(), |i| i + "spiffe://".len());
        if value[..authority_end].contains(['{', '}']) {
            return Err(EntryError::BadTemplate {
                value: value.to_owned(),
                problem: "placeholders may appear only in the path".into(),
            });
        }
        let parts = split(value)?;
        // The template must be a valid workload ID whatever it is filled with.
        let sample: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                Part::Placeholder { .. } => "x",
            })
            .collect();
        super::entry::parse_workload_id(&sample, trust_domain)?;
        Ok(Self {
            text: value.to_owned(),
            form: Form::Templated(parts),
        })
    }

    /// The ID for a caller with `selectors`, or `None` when the template
    /// needs a value the caller does not have (exactly once).
    pub fn resolve(&self, selectors: &SelectorSet) -> Option<SpiffeId> {
        let parts = match &self.form {
            Form::Fixed(id) => return Some(id.clone()),
            Form::Templated(parts) => parts,
        };
        let mut out = String::with_capacity(self.text.len());
        for part in parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Placeholder { kind, key } => {
                    out.push_str(single_value(selectors, *kind, key)?)
                }
            }
        }
        if out.len() > MAX_SPIFFE_ID_LEN {
            return None;
        }
        SpiffeId::new(&out).ok()
    }

    /// The fixed ID, when the template has no placeholders.
    pub fn as_fixed(&self) -> Option<&SpiffeId> {
        match &self.form {
            Form::Fixed(id) => Some(id),
            Form::Templated(_) => None,
        }
    }

    /// True when the ID depends on the caller.
    pub fn is_template(&self) -> bool {
        matches!(self.form, Form::Templated(_))
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for IdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn split(value: &str) -> Result<Vec<Part>, EntryError> {
    let bad = |problem: &str| EntryError::BadTemplate {
        value: value.to_owned(),
        problem: problem.to_owned(),
    };
    let mut parts = Vec::new();
    let mut rest = value;
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err(bad("'}' without '{'"));
        }
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_owned()));
        }
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| bad("'{' without '}'"))?;
        let name = &after[..close];
        if !TEMPLATE_KEYS.contains(&name) {
            return Err(bad(&format!(
                "unknown placeholder {{{name}}}; a template may use: {}",
                TEMPLATE_KEYS.join(", ")
            )));
        }
        let (kind, key) = name
            .split_once(':')
            .ok_or_else(|| bad("placeholder without a type"))?;
        let kind = match kind {
            "unix" => SelectorType::Unix,
            _ => SelectorType::K8s,
        };
        parts.push(Part::Placeholder {
            kind,
            key: key.to_owned(),
        });
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(bad("'}' without '{'"));
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    Ok(parts)
}

/// The one value of `kind:key` among `selectors`, if it can be a path
/// segment.
fn single_value<'a>(selectors: &'a SelectorSet, kind: SelectorType, key: &str) -> Option<&'a str> {
    let mut values = selectors
        .iter()
        .filter(|s| s.kind() == kind && s.key() == key)
        .filter_map(|s| s.value().split_once(':').map(|(_, v)| v));
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let segment_ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    segment_ok.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::Selector;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn selectors(s: &[&str]) -> SelectorSet {
        s.iter().map(|s| s.parse::<Selector>().unwrap()).collect()
    }

    #[test]
    fn fixed_ids_resolve_to_themselves() {
        let t = IdTemplate::parse("spiffe://example.org/svc", &td()).unwrap();
        assert!(!t.is_template());
        assert_eq!(
            t.resolve(&selectors(&[])).unwrap().to_string(),
            "spiffe://example.org/svc"
        );
    }

    #[test]
    fn placeholders_fill_from_the_callers_selectors() {
        let t = IdTemplate::parse(
            "spiffe://example.org/user/{unix:user}/uid-{unix:uid}",
            &td(),
        )
        .unwrap();
        assert!(t.is_template());
        let alice = selectors(&["unix:user:alice", "unix:uid:1000", "unix:gid:5"]);
        assert_eq!(
            t.resolve(&alice).unwrap().to_string(),
            "spiffe://example.org/user/alice/uid-1000"
        );
        // No user name (lookup failed): no identity, never a partial one.
        assert!(t.resolve(&selectors(&["unix:uid:1000"])).is_none());
        // A value that cannot be a path segment does not match.
        assert!(
            t.resolve(&selectors(&["unix:user:a/b", "unix:uid:1"]))
                .is_none()
        );
        assert!(
            t.resolve(&selectors(&["unix:user:..", "unix:uid:1"]))
                .is_none()
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let cases = [
            (
                "spiffe://example.org/{unix:supplementary_gid}",
                "unknown placeholder",
            ),
            ("spiffe://example.org/{nope}", "unknown placeholder"),
            ("spiffe://example.org/{unix:user", "'{' without '}'"),
            ("spiffe://example.org/unix:user}", "'}' without '{'"),
            ("spiffe://{k8s:ns}.org/x", "only in the path"),
            (
                "spiffe://other.org/{unix:user}",
                "outside the agent's trust domain",
            ),
            (
                "spiffe://example.org/a//{unix:user}",
                "not a valid SPIFFE ID",
            ),
        ];
        for (value, want) in cases {
            let err = IdTemplate::parse(value, &td()).unwrap_err();
            assert!(err.to_string().contains(want), "{value}: {err}");
        }
    }
}
