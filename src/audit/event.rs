//! What a record says: [`AuditEvent`] (the decision, as callers build it)
//! and [`AuditRecord`] (an event as read back, with its place in the
//! chain).
//!
//! A record's `decision` field is an [`Outcome`] (allow, deny, or info for
//! what decides nothing), not the policy engine's `policy::Decision`: this
//! module is a leaf, and records refusals that no policy made.
//!
//! An event never carries a token or a key: `token_id` is a `jti` or a
//! certificate serial. Events are bounded here, on the caller's thread:
//! [`AuditEvent::to_body`] cuts the longest text fields (with a marker
//! saying how long they were) until the record fits in
//! [`MAX_LINE`](super::MAX_LINE), so a long intent never costs the
//! decision its record.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::files::{Hash, MAX_LINE};
use super::seal::Seal;

/// Room left in a line for the envelope the writer adds before the event:
/// `{"seq":<20 digits>,"time":"<RFC 3339>","prev":"<64 hex>",`.
pub(super) const ENVELOPE_MAX: usize = 160;
/// Longest serialized event, in bytes.
pub(super) const MAX_BODY: usize = MAX_LINE - ENVELOPE_MAX;
/// Most bytes kept of an audience or a tool name, which any caller of the
/// validation RPCs chooses: longer ones are cut and marked with their
/// length and SHA-256, so a record still tells them apart without storing
/// what a caller made up (issue 15, finding 5: four processes wrote 83 MB
/// in 5 s through 4 KiB audiences).
const CALLER_TEXT_MAX: usize = 256;
/// Successive limits tried on oversized events: (bytes per text field,
/// items per list). The last always fits: 21 strings of at most
/// 16 + marker characters, each escaped at most sixfold.
const SHRINK_STEPS: [(usize, usize); 10] = [
    (16384, 64),
    (8192, 64),
    (4096, 64),
    (2048, 32),
    (1024, 32),
    (512, 16),
    (256, 16),
    (128, 8),
    (64, 8),
    (16, 4),
];

/// What happened. The names on disk are kebab-case (`issue-x509`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// An X.509-SVID was issued (or refused).
    IssueX509,
    /// A JWT-SVID was issued (or refused).
    IssueJwt,
    /// A task began.
    TaskBegin,
    /// A task's token was renewed.
    TaskRenew,
    /// A task ended (completed, owner exited, entry removed).
    TaskEnd,
    /// A task token was exchanged for another audience.
    Exchange,
    /// A token was validated.
    Validate,
    /// A request was refused before any other kind applied.
    Deny,
    /// An operator revoked a task or a credential.
    Revoke,
    /// A task or credential reached its deadline.
    Expire,
    /// A registration entry was created, changed or removed.
    EntryChange,
    /// The policy set was (re)loaded.
    PolicyReload,
    /// A join token admitting a node was created (the fleet's server; the
    /// record names the node and the expiry, never the token).
    JoinToken,
    /// The writer found the trail damaged or cut at start and says what it
    /// did; always the first record it writes after such a start.
    AuditRecovered,
    /// A fleet node attested, renewed its SVID or was evicted (or was
    /// refused): the server's trail.
    NodeAttest,
    /// A replica of the fleet's server sent a task's end to its nodes'
    /// sync streams: the server's trail.
    TaskFanOut,
}

/// How a recorded event came out: the `decision` field of a record.
///
/// Not `policy::Decision`: that is the policy engine's verdict on
/// one request, with the policies that gave it and a reason. A record's
/// outcome is coarser (any refusal, by policy or not, is `Deny`) and has a
/// third value for events that decide nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Granted.
    Allow,
    /// Refused.
    Deny,
    /// Not a decision: something that happened (an expiry, a reload).
    Info,
}

/// One decision, as a caller records it. `event` and `decision` are
/// required (so a record can never lack them); the rest is optional:
///
/// ```
/// use tether::audit::{AuditEvent, Outcome, EventKind};
/// let event = AuditEvent {
///     spiffe_id: Some("spiffe://example.org/agent".into()),
///     pid: Some(4242),
///     ..AuditEvent::new(EventKind::IssueJwt, Outcome::Allow)
/// };
/// # let _ = event;
/// ```
///
/// Never a token, never a key: `token_id` is a `jti` or a certificate
/// serial. Absent fields are left out of the line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What happened.
    pub event: EventKind,
    /// How it came out (the field keeps its name on disk: `decision`).
    pub decision: Outcome,
    /// The subject's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The calling process, from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Its uid, from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its executable's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    /// The task (a token's `txn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The task's intent, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The audience asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The tools asked for or granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Why (a denial's reason, a task's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// The credential: a `jti` or a certificate serial, never the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The registration entry that granted the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    /// The fleet node that asked (its SPIFFE ID), on the server's trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The actor chain of an exchanged token, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    /// How many more identical denials came within the interval after the
    /// one this record repeats (a record of its own, once the interval is
    /// over; see the audit module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
    /// The agent's seal, on `audit-recovered` records only (see
    /// `audit::seal`): what the agent found at start cannot be made up
    /// by someone without its audit key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<Seal>,
}

/// A record as read back from the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Its place in the chain, from 1, consecutive across files.
    pub seq: u64,
    /// When it was recorded (the caller's clock at `record`).
    pub time: OffsetDateTime,
    /// SHA-256 (lowercase hex) of the previous record's line; 64 zeros
    /// for the first.
    pub prev: String,
    /// The decision.
    pub event: AuditEvent,
    /// The line exactly as stored, without its newline: what the next
    /// record's `prev` hashes, and what `tail --json` prints.
    pub line: String,
}

/// A line as serde sees it: the envelope, then the event's fields.
#[derive(Deserialize)]
struct RawRecord {
    seq: u64,
    time: String,
    prev: String,
    #[serde(flatten)]
    event: AuditEvent,
}

// === impl EventKind ===

impl EventKind {
    /// The name on disk (`issue-x509`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IssueX509 => "issue-x509",
            Self::IssueJwt => "issue-jwt",
            Self::TaskBegin => "task-begin",
            Self::TaskRenew => "task-renew",
            Self::TaskEnd => "task-end",
            Self::Exchange => "exchange",
            Self::Validate => "validate",
            Self::Deny => "deny",
            Self::Revoke => "revoke",
            Self::Expire => "expire",
            Self::EntryChange => "entry-change",
            Self::PolicyReload => "policy-reload",
            Self::JoinToken => "join-token",
            Self::AuditRecovered => "audit-recovered",
            Self::NodeAttest => "node-attest",
            Self::TaskFanOut => "task-fan-out",
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// The name on disk (`allow`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Info => "info",
        }
    }
}

// === impl AuditEvent ===

impl AuditEvent {
    /// An event with only its kind and outcome; fill the rest with struct
    /// update syntax.
    pub fn new(event: EventKind, decision: Outcome) -> Self {
        Self {
            event,
            decision,
            spiffe_id: None,
            pid: None,
            uid: None,
            executable: None,
            task_id: None,
            intent: None,
            audience: None,
            tools: Vec::new(),
            reason: None,
            policy_ids: Vec::new(),
            token_id: None,
            entry_id: None,
            node: None,
            actors: Vec::new(),
            repeated: None,
            seal: None,
        }
    }

    /// The event as the JSON object that follows the envelope, at most
    /// [`MAX_BODY`] bytes: oversized text fields and lists are cut, with a
    /// marker, never refused.
    pub(super) fn to_body(&self) -> Vec<u8> {
        let bounded;
        let this = if self.has_long_caller_text() {
            bounded = self.with_caller_text_bounded();
            &bounded
        } else {
            self
        };
        this.to_bounded_body()
    }

    /// Whether an audience or a tool is longer than [`CALLER_TEXT_MAX`].
    fn has_long_caller_text(&self) -> bool {
        self.audience
            .iter()
            .chain(&self.tools)
            .any(|t| t.len() > CALLER_TEXT_MAX)
    }

    /// A copy with the audience and each tool cut to [`CALLER_TEXT_MAX`],
    /// marked with the length and hash of what was cut.
    fn with_caller_text_bounded(&self) -> AuditEvent {
        AuditEvent {
            audience: self.audience.as_deref().map(cut_with_hash),
            tools: self.tools.iter().map(|t| cut_with_hash(t)).collect(),
            ..self.clone()
        }
    }

    fn to_bounded_body(&self) -> Vec<u8> {
        // JSON is never shorter than the text it holds: a hostile event is
        // cut without being serialized whole first.
        if self.text_len() <= MAX_BODY
            && let Some(body) = serialized_within_bound(self)
        {
            return body;
        }
        for (max_text, max_items) in SHRINK_STEPS {
            if let Some(body) = serialized_within_bound(&self.cut(max_text, max_items)) {
                return body;
            }
        }
        // Unreachable by the arithmetic above; still never a panic, and
        // still a record of the decision.
        let bare = AuditEvent {
            pid: self.pid,
            uid: self.uid,
            reason: Some("…[every text field cut: the event did not fit a line]".into()),
            ..AuditEvent::new(self.event, self.decision)
        };
        serde_json::to_vec(&bare).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Bytes of text in the event's strings.
    fn text_len(&self) -> usize {
        let texts = [
            &self.spiffe_id,
            &self.executable,
            &self.task_id,
            &self.intent,
            &self.audience,
            &self.reason,
            &self.token_id,
            &self.entry_id,
            &self.node,
        ];
        let lists = [&self.tools, &self.policy_ids, &self.actors];
        texts
            .iter()
            .flat_map(|t| t.as_deref())
            .map(str::len)
            .sum::<usize>()
            + lists
                .iter()
                .flat_map(|l| l.iter())
                .map(String::len)
                .sum::<usize>()
    }

    /// A copy with each text at most `max_text` bytes and each list at most
    /// `max_items` items, marked where cut. Copies only what it keeps.
    fn cut(&self, max_text: usize, max_items: usize) -> AuditEvent {
        let text = |t: &Option<String>| t.as_deref().map(|t| cut_text(t, max_text));
        let list = |items: &[String]| {
            if items.len() <= max_items {
                return items.iter().map(|t| cut_text(t, max_text)).collect();
            }
            let kept = max_items.saturating_sub(1);
            let mut out: Vec<String> = items[..kept]
                .iter()
                .map(|t| cut_text(t, max_text))
                .collect();
            out.push(format!("…[{} more]", items.len() - kept));
            out
        };
        AuditEvent {
            event: self.event,
            decision: self.decision,
            spiffe_id: text(&self.spiffe_id),
            pid: self.pid,
            uid: self.uid,
            executable: text(&self.executable),
            task_id: text(&self.task_id),
            intent: text(&self.intent),
            audience: text(&self.audience),
            tools: list(&self.tools),
            reason: text(&self.reason),
            policy_ids: list(&self.policy_ids),
            token_id: text(&self.token_id),
            entry_id: text(&self.entry_id),
            node: text(&self.node),
            actors: list(&self.actors),
            repeated: self.repeated,
            seal: self.seal.clone(),
        }
    }
}

// === impl AuditRecord ===

impl AuditRecord {
    /// Parses one line of the trail (without its newline).
    pub(super) fn parse(line: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
        let raw: RawRecord = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let time = OffsetDateTime::parse(&raw.time, &Rfc3339)
            .map_err(|e| format!("time {:?} is not RFC 3339: {e}", raw.time))?;
        if Hash::parse(&raw.prev).is_none() {
            return Err("prev is not 64 lowercase hex digits".into());
        }
        if raw.seq == 0 {
            return Err("seq 0: records count from 1".into());
        }
        Ok(Self {
            seq: raw.seq,
            time,
            prev: raw.prev,
            event: raw.event,
            line: text.to_owned(),
        })
    }
}

/// The line for one record: the envelope, then the event's fields.
pub(super) fn envelope(seq: u64, time: &str, prev: Hash, body: &[u8]) -> Vec<u8> {
    // `body` is a JSON object with at least `event` and `decision`: splice
    // the envelope in after its `{`.
    let fields = body.strip_prefix(b"{").unwrap_or(body);
    let mut line = Vec::with_capacity(ENVELOPE_MAX + fields.len() + 1);
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(seq.to_string().as_bytes());
    line.extend_from_slice(b",\"time\":\"");
    line.extend_from_slice(time.as_bytes());
    line.extend_from_slice(b"\",\"prev\":\"");
    line.extend_from_slice(&prev.to_hex());
    line.extend_from_slice(b"\",");
    line.extend_from_slice(fields);
    line
}

fn serialized_within_bound(event: &AuditEvent) -> Option<Vec<u8>> {
    serde_json::to_vec(event)
        .ok()
        .filter(|body| body.len() <= MAX_BODY)
}

/// `text` cut to [`CALLER_TEXT_MAX`] bytes and marked with its length and
/// SHA-256 (lowercase hex), or as it is when short enough.
fn cut_with_hash(text: &str) -> String {
    if text.len() <= CALLER_TEXT_MAX {
        return text.to_owned();
    }
    let mut end = CALLER_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}…[cut from {} bytes, sha256 {hex}]",
        &text[..end],
        text.len()
    )
}

/// `text` cut to at most `max` bytes (at a character boundary), saying
/// how long it was.
fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut from {} bytes]", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_audiences_and_tools_are_cut_and_marked_with_their_hash() {
        let long = "a".repeat(4096);
        let event = AuditEvent {
            audience: Some(long.clone()),
            tools: vec!["t".repeat(1024), "short".into()],
            intent: Some("i".repeat(1000)),
            ..AuditEvent::new(EventKind::Validate, Outcome::Deny)
        };
        let body: serde_json::Value = serde_json::from_slice(&event.to_body()).unwrap();
        let audience = body["audience"].as_str().unwrap();
        assert!(
            audience.starts_with(&"a".repeat(CALLER_TEXT_MAX)),
            "{audience}"
        );
        assert!(audience.len() < CALLER_TEXT_MAX + 120, "{}", audience.len());
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, long.as_bytes());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            audience.ends_with(&format!("…[cut from 4096 bytes, sha256 {hex}]")),
            "{audience}"
        );
        assert!(
            body["tools"][0]
                .as_str()
                .unwrap()
                .contains("cut from 1024 bytes")
        );
        assert_eq!(body["tools"][1], "short");
        // The operator-facing intent is bounded by its own input limit.
        assert_eq!(body["intent"].as_str().unwrap().len(), 1000);
    }

    #[test]
    fn absent_fields_are_left_out_and_names_are_stable() {
        let event = AuditEvent {
            spiffe_id: Some("spiffe://example.org/a".into()),
            pid: Some(7),
            tools: vec!["jira.search".into()],
            ..AuditEvent::new(EventKind::IssueX509, Outcome::Allow)
        };
        assert_eq!(
            String::from_utf8(event.to_body()).unwrap(),
            r#"{"event":"issue-x509","decision":"allow","spiffe_id":"spiffe://example.org/a","pid":7,"tools":["jira.search"]}"#
        );
        for kind in [
            EventKind::IssueX509,
            EventKind::IssueJwt,
            EventKind::TaskBegin,
            EventKind::TaskRenew,
            EventKind::TaskEnd,
            EventKind::Exchange,
            EventKind::Validate,
            EventKind::Deny,
            EventKind::Revoke,
            EventKind::Expire,
            EventKind::EntryChange,
            EventKind::PolicyReload,
            EventKind::JoinToken,
            EventKind::AuditRecovered,
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        for decision in [Outcome::Allow, Outcome::Deny, Outcome::Info] {
            assert_eq!(
                serde_json::to_value(decision).unwrap(),
                serde_json::json!(decision.as_str())
            );
        }
    }

    #[test]
    fn envelopes_parse_back() {
        let event = AuditEvent {
            reason: Some("quote \" and newline \n".into()),
            ..AuditEvent::new(EventKind::Deny, Outcome::Deny)
        };
        let line = envelope(
            3,
            "2026-01-01T00:00:00.123456Z",
            Hash::of(b"x"),
            &event.to_body(),
        );
        let record = AuditRecord::parse(&line).unwrap();
        assert_eq!(record.seq, 3);
        assert_eq!(record.prev, Hash::of(b"x").to_string());
        assert_eq!(record.event, event);
        assert_eq!(record.line.as_bytes(), line.as_slice());
        assert_eq!(record.time.nanosecond(), 123_456_000);

        for (bad, want) in [
            (&b"{\"seq\":1}"[..], "missing field"),
            (b"not json", "expected"),
            (
                b"{\"seq\":0,\"time\":\"2026-01-01T00:00:00Z\",\"prev\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"event\":\"deny\",\"decision\":\"deny\"}",
                "seq 0",
            ),
            (
                b"{\"seq\":1,\"time\":\"yesterday\",\"prev\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"event\":\"deny\",\"decision\":\"deny\"}",
                "RFC 3339",
            ),
            (
                b"{\"seq\":1,\"time\":\"2026-01-01T00:00:00Z\",\"prev\":\"00\",\"event\":\"deny\",\"decision\":\"deny\"}",
                "prev",
            ),
            (
                b"{\"seq\":1,\"time\":\"2026-01-01T00:00:00Z\",\"prev\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"event\":\"mint\",\"decision\":\"deny\"}",
                "unknown variant",
            ),
        ] {
            let err = AuditRecord::parse(bad).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn oversized_events_are_cut_not_refused() {
        // One huge field: cut, marked with its length; the rest kept.
        let event = AuditEvent {
            intent: Some("i".repeat(200_000)),
            spiffe_id: Some("spiffe://example.org/a".into()),
            ..AuditEvent::new(EventKind::TaskBegin, Outcome::Allow)
        };
        let body = event.to_body();
        assert!(body.len() <= MAX_BODY, "{}", body.len());
        let back: AuditEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.spiffe_id, event.spiffe_id);
        assert!(
            back.intent
                .as_deref()
                .unwrap()
                .ends_with("…[cut from 200000 bytes]")
        );

        // Everything hostile at once: control characters (escaped sixfold),
        // multibyte characters at the cut, and long lists of long items.
        let nasty = "\u{1}é".repeat(10_000);
        let event = AuditEvent {
            spiffe_id: Some(nasty.clone()),
            executable: Some(nasty.clone()),
            task_id: Some(nasty.clone()),
            intent: Some(nasty.clone()),
            audience: Some(nasty.clone()),
            reason: Some(nasty.clone()),
            token_id: Some(nasty.clone()),
            entry_id: Some(nasty.clone()),
            tools: vec![nasty.clone(); 200],
            policy_ids: vec![nasty.clone(); 200],
            actors: vec![nasty; 200],
            ..AuditEvent::new(EventKind::Exchange, Outcome::Deny)
        };
        let body = event.to_body();
        assert!(body.len() <= MAX_BODY, "{}", body.len());
        let back: AuditEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.event, EventKind::Exchange);
        assert!(back.tools.last().unwrap().ends_with("more]"));

        // The envelope always fits beside the largest body.
        let line = envelope(
            u64::MAX,
            "2026-01-01T00:00:00.123456789+23:59",
            Hash::ZERO,
            &body,
        );
        assert!(line.len() <= MAX_LINE);
    }
}
