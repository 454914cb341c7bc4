//! Registration entries: the rule "a caller whose selectors include these
//! gets this SPIFFE ID", with the SVID parameters that go with it.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use spiffe::{SpiffeId, TrustDomain};

use super::selector::{Selector, SelectorError, SelectorSet};
use super::template::IdTemplate;

/// Longest hint accepted (the Workload API spec asks for at most 1024 bytes).
pub const MAX_HINT_LEN: usize = 1024;
/// Most selectors one entry may require.
pub const MAX_SELECTORS: usize = 64;
/// Most DNS names one entry may carry.
pub const MAX_DNS_NAMES: usize = 32;
/// The SPIFFE ID spec asks issuers not to generate IDs longer than this.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Stable identifier of an entry. For entries from the config file it is
/// derived from the SPIFFE ID and the selectors, so it survives restarts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(String);

/// Longest audience name an entry may declare.
pub const MAX_AUDIENCE_LEN: usize = 1024;
/// Longest entry id accepted from an operator.
pub const MAX_ENTRY_ID_LEN: usize = 64;

/// Where an entry came from, which decides who may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntrySource {
    /// The `[[entries]]` of the config file: the file is the source of truth.
    Config,
    /// Created through the admin API; persisted in the store.
    Api,
    /// Synced from the fleet's `tether server` (an agent in fleet mode):
    /// the server is the source of truth, and the set is replaced whole.
    Server,
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Stable identifier.
    pub id: EntryId,
    /// The identity granted (a template filled from the caller's selectors,
    /// or a fixed ID).
    pub spiffe_id: IdTemplate,
    /// All of these must be among the caller's selectors.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime for this entry; the agent default when `None`.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime for this entry; the agent default when `None`.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs of the X.509-SVID (the first is also the subject CN).
    pub dns_names: Vec<String>,
    /// Operator guidance for workloads holding several SVIDs.
    pub hint: Option<String>,
    /// Foreign trust domains whose bundles this entry's holders receive.
    pub federates_with: BTreeSet<TrustDomain>,
    /// Audience names this entry's holders answer to besides their SPIFFE
    /// ID (an MCP server's URI, say): a task token addressed to one of them
    /// may be exchanged by the holder.
    pub audiences: Vec<String>,
    /// Each matching process gets its own X.509-SVID (key and certificate),
    /// revoked when the process exits, instead of one shared per entry.
    pub process_bound: bool,
    /// Who owns the entry.
    pub source: EntrySource,
    /// Bumped on every update (1 when created).
    pub revision: u64,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

/// What an operator writes: an entry in the config file (`[[entries]]`) or
/// in an admin API request, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// `spiffe://<trust domain>/<path>`, in the agent's trust domain; the
    /// path may hold `{type:key}` placeholders (see `template`).
    pub spiffe_id: String,
    /// `type:key:value` selectors, all of which the caller must have.
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Optional hint returned with the SVIDs.
    #[serde(default)]
    pub hint: Option<String>,
    /// DNS SANs for the X.509-SVID.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Overrides the agent's `x509_svid_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub x509_svid_ttl: Option<Duration>,
    /// Overrides the agent's `jwt_svid_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub jwt_svid_ttl: Option<Duration>,
    /// Trust domains (each defined by a `[[federation]]`) to federate with.
    #[serde(default)]
    pub federates_with: Vec<String>,
    /// Audience names the holders answer to besides their SPIFFE ID.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// One X.509-SVID per process, revoked (CRL) when the process exits.
    #[serde(default)]
    pub process_bound: bool,
}

/// Why an entry was refused. Each variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// `spiffe_id` is not a SPIFFE ID.
    #[error("spiffe_id {value:?} is not a valid SPIFFE ID")]
    BadSpiffeId {
        /// The value given.
        value: String,
        /// What the SPIFFE ID parser said.
        #[source]
        source: spiffe::SpiffeIdError,
    },
    /// `spiffe_id` is valid but not in canonical form (uppercase trust domain, say).
    #[error("spiffe_id {value:?} is not in canonical form; write it as {canonical:?}")]
    NotCanonical {
        /// The value given.
        value: String,
        /// How it should be written.
        canonical: String,
    },
    /// `spiffe_id` belongs to another trust domain.
    #[error("spiffe_id {value:?} is outside the agent's trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The value given.
        value: String,
        /// The agent's trust domain.
        trust_domain: String,
    },
    /// `spiffe_id` has no path: that names the trust domain, not a workload.
    #[error("spiffe_id {0:?} has no path; a workload ID looks like spiffe://domain/service")]
    NoPath(String),
    /// A string field is longer than allowed.
    #[error("{field} is {len} bytes long; the limit is {limit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A list field has too many items.
    #[error("{field} has {len} items; the limit is {limit}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// How many were given.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// No selectors: the entry would match every process on the node.
    #[error(
        "selectors is empty; an entry needs at least one selector (it would match every process)"
    )]
    NoSelectors,
    /// One of the selectors is malformed.
    #[error("selectors")]
    BadSelector(#[from] SelectorError),
    /// A TTL of zero.
    #[error("{0} must be greater than zero")]
    ZeroTtl(&'static str),
    /// A DNS name that is not one.
    #[error("dns_names: {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// A hint that is empty.
    #[error("hint must not be empty when given")]
    EmptyHint,
    /// `federates_with` names something that is not a trust domain.
    #[error("federates_with: {value:?} is not a trust domain")]
    BadFederatedDomain {
        /// The value given.
        value: String,
        /// What the parser said.
        #[source]
        source: spiffe::SpiffeIdError,
    },
    /// `federates_with` names a domain no `[[federation]]` defines.
    #[error("federates_with: {0:?} has no [[federation]] section giving its bundle")]
    UnknownFederation(String),
    /// `federates_with` names the agent's own trust domain.
    #[error("federates_with: {0:?} is the agent's own trust domain")]
    FederatesWithSelf(String),
    /// A malformed SPIFFE ID template.
    #[error("spiffe_id {value:?}: {problem}")]
    BadTemplate {
        /// The value given.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An audience name that is empty, too long or has spaces.
    #[error("audiences: {0:?} is not an audience name (non-empty, at most 1024 bytes, no spaces)")]
    BadAudience(String),
    /// An entry id that tether could not have issued.
    #[error("id {0:?} is not an entry id")]
    BadId(String),
}

// === impl EntryId ===

impl EntryId {
    /// The id of a config-file entry: a digest of what identifies it, so the
    /// same entry keeps the same id across restarts.
    fn for_config(spiffe_id: &IdTemplate, selectors: &SelectorSet) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(spiffe_id.as_str().as_bytes());
        for selector in selectors {
            ctx.update(b"\n");
            ctx.update(selector.to_string().as_bytes());
        }
        let digest = ctx.finish();
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self(format!("cfg-{hex}"))
    }

    /// A fresh id for an entry created through the admin API: 96 random
    /// bits, so ids are never reused.
    pub fn random() -> Result<Self, EntryError> {
        let mut bytes = [0u8; 12];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| EntryError::BadId("<random number generator failed>".into()))?;
        Ok(Self(format!("ent-{}", URL_SAFE_NO_PAD.encode(bytes))))
    }

    /// An id given by an operator or read from the store: only the shapes
    /// tether issues are accepted.
    pub fn parse(value: &str) -> Result<Self, EntryError> {
        let ok = (value.starts_with("ent-") || value.starts_with("cfg-"))
            && value.len() <= MAX_ENTRY_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(EntryError::BadId(value.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl RegistrationEntry ===

impl RegistrationEntry {
    /// Whether `other` grants the same thing: every field but the
    /// bookkeeping (revision, timestamps).
    pub fn grants_as(&self, other: &RegistrationEntry) -> bool {
        self.id == other.id
            && self.spiffe_id == other.spiffe_id
            && self.selectors == other.selectors
            && self.x509_svid_ttl == other.x509_svid_ttl
            && self.jwt_svid_ttl == other.jwt_svid_ttl
            && self.dns_names == other.dns_names
            && self.hint == other.hint
            && self.federates_with == other.federates_with
            && self.audiences == other.audiences
            && self.process_bound == other.process_bound
            && self.source == other.source
    }

    /// Validates a config-file entry against the agent's trust domain and the
    /// federations it knows. Its id is derived from its SPIFFE ID and
    /// selectors, so it is stable across restarts.
    pub fn from_config(
        spec: &EntrySpec,
        trust_domain: &TrustDomain,
        federations: &BTreeSet<TrustDomain>,
    ) -> Result<Self, EntryError> {
        let now = SystemTime::now();
        Self::build(spec, trust_domain, federations, |template, selectors| {
            Meta {
                id: EntryId::for_config(template, selectors),
                source: EntrySource::Config,
                revision: 1,
                created_at: now,
                updated_at: now,
            }
        })
    }

    /// Validates an entry for the admin API (or one read back from the
    /// store) with the given identity and bookkeeping.
    pub fn from_api(
        spec: &EntrySpec,
        trust_domain: &TrustDomain,
        federations: &BTreeSet<TrustDomain>,
        id: EntryId,
        revision: u64,
        created_at: SystemTime,
        updated_at: SystemTime,
    ) -> Result<Self, EntryError> {
        Self::build(spec, trust_domain, federations, |_, _| Meta {
            id,
            source: EntrySource::Api,
            revision,
            created_at,
            updated_at,
        })
    }

    fn build(
        config: &EntrySpec,
        trust_domain: &TrustDomain,
        federations: &BTreeSet<TrustDomain>,
        meta: impl FnOnce(&IdTemplate, &SelectorSet) -> Meta,
    ) -> Result<Self, EntryError> {
        check_len("spiffe_id", config.spiffe_id.len(), MAX_SPIFFE_ID_LEN)?;
        let spiffe_id = IdTemplate::parse(&config.spiffe_id, trust_domain)?;

        if config.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        check_count("selectors", config.selectors.len(), MAX_SELECTORS)?;
        let selectors = config
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<SelectorSet, _>>()?;

        if config.x509_svid_ttl == Some(Duration::ZERO) {
            return Err(EntryError::ZeroTtl("x509_svid_ttl"));
        }
        if config.jwt_svid_ttl == Some(Duration::ZERO) {
            return Err(EntryError::ZeroTtl("jwt_svid_ttl"));
        }

        check_count("dns_names", config.dns_names.len(), MAX_DNS_NAMES)?;
        for name in &config.dns_names {
            if !is_dns_name(name) {
                return Err(EntryError::BadDnsName(name.clone()));
            }
        }

        if let Some(hint) = &config.hint {
            if hint.is_empty() {
                return Err(EntryError::EmptyHint);
            }
            check_len("hint", hint.len(), MAX_HINT_LEN)?;
        }

        check_count("federates_with", config.federates_with.len(), MAX_DNS_NAMES)?;
        let mut federates_with = BTreeSet::new();
        for value in &config.federates_with {
            let domain =
                TrustDomain::new(value).map_err(|source| EntryError::BadFederatedDomain {
                    value: value.clone(),
                    source,
                })?;
            if &domain == trust_domain {
                return Err(EntryError::FederatesWithSelf(value.clone()));
            }
            if !federations.contains(&domain) {
                return Err(EntryError::UnknownFederation(value.clone()));
            }
            federates_with.insert(domain);
        }

        check_count("audiences", config.audiences.len(), MAX_DNS_NAMES)?;
        for audience in &config.audiences {
            if audience.is_empty()
                || audience.len() > MAX_AUDIENCE_LEN
                || audience.chars().any(char::is_whitespace)
            {
                return Err(EntryError::BadAudience(audience.chars().take(80).collect()));
            }
        }

        let meta = meta(&spiffe_id, &selectors);
        Ok(Self {
            id: meta.id,
            spiffe_id,
            selectors,
            x509_svid_ttl: config.x509_svid_ttl,
            jwt_svid_ttl: config.jwt_svid_ttl,
            dns_names: config.dns_names.clone(),
            hint: config.hint.clone(),
            federates_with,
            audiences: config.audiences.clone(),
            process_bound: config.process_bound,
            source: meta.source,
            revision: meta.revision,
            created_at: meta.created_at,
            updated_at: meta.updated_at,
        })
    }

    /// The entry as an operator wrote it.
    pub fn to_spec(&self) -> EntrySpec {
        EntrySpec {
            spiffe_id: self.spiffe_id.to_string(),
            selectors: self.selectors.iter().map(ToString::to_string).collect(),
            hint: self.hint.clone(),
            dns_names: self.dns_names.clone(),
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            federates_with: self
                .federates_with
                .iter()
                .map(ToString::to_string)
                .collect(),
            audiences: self.audiences.clone(),
            process_bound: self.process_bound,
        }
    }

    /// True when both grant the same ID (template) on the same selectors:
    /// a duplicate.
    pub fn same_rule(&self, other: &Self) -> bool {
        self.spiffe_id.as_str() == other.spiffe_id.as_str() && self.selectors == other.selectors
    }

    /// True when every selector this entry requires is among `caller`'s.
    pub fn matches(&self, caller: &SelectorSet) -> bool {
        self.selectors.is_subset(caller)
    }
}

/// Bookkeeping that depends on where an entry came from.
struct Meta {
    id: EntryId,
    source: EntrySource,
    revision: u64,
    created_at: SystemTime,
    updated_at: SystemTime,
}

/// Parses a workload SPIFFE ID: canonical, in `trust_domain`, with a path.
pub fn parse_workload_id(value: &str, trust_domain: &TrustDomain) -> Result<SpiffeId, EntryError> {
    check_len("spiffe_id", value.len(), MAX_SPIFFE_ID_LEN)?;
    let id = SpiffeId::new(value).map_err(|source| EntryError::BadSpiffeId {
        value: value.to_owned(),
        source,
    })?;
    let canonical = id.to_string();
    if canonical != value {
        return Err(EntryError::NotCanonical {
            value: value.to_owned(),
            canonical,
        });
    }
    if !id.is_member_of(trust_domain) {
        return Err(EntryError::ForeignTrustDomain {
            value: value.to_owned(),
            trust_domain: trust_domain.to_string(),
        });
    }
    if id.path().is_empty() {
        return Err(EntryError::NoPath(value.to_owned()));
    }
    Ok(id)
}

fn check_len(field: &'static str, len: usize, limit: usize) -> Result<(), EntryError> {
    if len > limit {
        return Err(EntryError::TooLong { field, len, limit });
    }
    Ok(())
}

fn check_count(field: &'static str, len: usize, limit: usize) -> Result<(), EntryError> {
    if len > limit {
        return Err(EntryError::TooMany { field, len, limit });
    }
    Ok(())
}

/// RFC 1123 host names, with an optional leading `*.` wildcard label.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn feds() -> BTreeSet<TrustDomain> {
        [TrustDomain::new("other.org").unwrap()].into()
    }

    fn config(spiffe_id: &str, selectors: &[&str]) -> EntrySpec {
        EntrySpec {
            spiffe_id: spiffe_id.into(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            ..EntrySpec::default()
        }
    }

    #[test]
    fn valid_entry_gets_a_stable_id() {
        let mut c = config(
            "spiffe://example.org/svc",
            &["unix:uid:1000", "unix:gid:1000"],
        );
        c.dns_names = vec!["svc.example.org".into(), "*.svc.local".into()];
        c.federates_with = vec!["other.org".into()];
        c.hint = Some("internal".into());
        let a = RegistrationEntry::from_config(&c, &td(), &feds()).unwrap();
        c.selectors.reverse();
        let b = RegistrationEntry::from_config(&c, &td(), &feds()).unwrap();
        assert_eq!(a.id, b.id, "selector order must not change the id");
        assert!(a.id.as_str().starts_with("cfg-"));
        let other = config("spiffe://example.org/svc2", &["unix:uid:1000"]);
        let c2 = RegistrationEntry::from_config(&other, &td(), &feds()).unwrap();
        assert_ne!(a.id, c2.id);
    }

    #[test]
    fn a_refusal_says_what_failed_and_its_cause_once() {
        let err = RegistrationEntry::from_config(
            &config("spiffe://example.org/x", &["1000"]),
            &td(),
            &feds(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "selectors");
        let text = crate::error::chain(&err);
        assert_eq!(
            text,
            "selectors: selector \"1000\" has no type: expected TYPE:KEY:VALUE such as unix:uid:1000"
        );

        let err =
            RegistrationEntry::from_config(&config("not-an-id", &["unix:uid:1"]), &td(), &feds())
                .unwrap_err();
        let cause = std::error::Error::source(&err)
            .expect("the parser's reason")
            .to_string();
        let text = crate::error::chain(&err);
        assert_eq!(
            text,
            format!("spiffe_id \"not-an-id\" is not a valid SPIFFE ID: {cause}")
        );
    }

    #[test]
    fn refuses_bad_entries() {
        let cases: Vec<(EntrySpec, &str)> = vec![
            (
                config("not-an-id", &["unix:uid:1"]),
                "not a valid SPIFFE ID",
            ),
            (
                config("spiffe://other.org/x", &["unix:uid:1"]),
                "outside the agent's trust domain",
            ),
            (
                config("spiffe://example.org", &["unix:uid:1"]),
                "has no path",
            ),
            (
                config("spiffe://Example.org/x", &["unix:uid:1"]),
                "canonical form",
            ),
            (
                config("spiffe://example.org/x", &[]),
                "needs at least one selector",
            ),
            (config("spiffe://example.org/x", &["uid:1"]), "unknown type"),
            (
                config("spiffe://example.org/x/", &["unix:uid:1"]),
                "not a valid SPIFFE ID",
            ),
            (
                EntrySpec {
                    x509_svid_ttl: Some(Duration::ZERO),
                    ..config("spiffe://example.org/x", &["unix:uid:1"])
                },
                "x509_svid_ttl must be greater than zero",
            ),
            (
                EntrySpec {
                    dns_names: vec!["bad name".into()],
                    ..config("spiffe://example.org/x", &["unix:uid:1"])
                },
                "not a valid DNS name",
            ),
            (
                EntrySpec {
                    federates_with: vec!["unknown.org".into()],
                    ..config("spiffe://example.org/x", &["unix:uid:1"])
                },
                "no [[federation]]",
            ),
            (
                EntrySpec {
                    federates_with: vec!["example.org".into()],
                    ..config("spiffe://example.org/x", &["unix:uid:1"])
                },
                "own trust domain",
            ),
            (
                EntrySpec {
                    hint: Some("h".repeat(MAX_HINT_LEN + 1)),
                    ..config("spiffe://example.org/x", &["unix:uid:1"])
                },
                "hint is 1025 bytes",
            ),
        ];
        for (c, want) in cases {
            let err = RegistrationEntry::from_config(&c, &td(), &feds()).unwrap_err();
            let err = crate::error::chain(&err);
            assert!(err.contains(want), "{c:?}: {err} (wanted {want:?})");
        }
    }

    #[test]
    fn matches_on_subset() {
        let e = RegistrationEntry::from_config(
            &config("spiffe://example.org/x", &["unix:uid:1000", "unix:gid:50"]),
            &td(),
            &feds(),
        )
        .unwrap();
        let caller: SelectorSet = ["unix:uid:1000", "unix:gid:50", "unix:user:alice"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(e.matches(&caller));
        let partial: SelectorSet = ["unix:uid:1000"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(!e.matches(&partial));
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "a.b", "x-1.example.org", "*.example.org"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["", "a..b", "-a.b", "a b", "*", "a.*.b", &"a".repeat(64)] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
