//! The printed forms, readable and JSON, of every kind of thing the CLI
//! prints.

use std::time::Duration;

use time::OffsetDateTime;

use super::text::{field_value, printable, relative};
use super::*;
use crate::audit::AuditRecord;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix(seconds).unwrap()
}

#[test]
fn relative_times_are_coarse() {
    let now = at(1_000_000).0;
    let cases = [
        (0, "in 0s"),
        (42, "in 42s"),
        (59 * 60 + 59, "in 59m"),
        (3600, "in 1h"),
        (3600 + 5 * 60, "in 1h 5m"),
        (86_400 * 2 + 3600 * 3, "in 2d 3h"),
        (-90, "1m ago"),
    ];
    for (delta, want) in cases {
        assert_eq!(relative(at(1_000_000 + delta).0, now), want, "{delta}");
    }
}

#[test]
fn timestamps_are_rfc3339_in_json() {
    let ts = at(1_700_000_000);
    assert_eq!(ts.to_string(), "2023-11-14T22:13:20Z");
    assert_eq!(
        serde_json::to_value(ts).unwrap(),
        serde_json::json!("2023-11-14T22:13:20Z")
    );
    // Outside RFC 3339's years: shown, not a panic.
    let far = Timestamp(OffsetDateTime::from_unix_timestamp(-100_000_000_000).unwrap());
    assert!(!far.to_string().is_empty());
}

#[test]
fn audit_records_are_one_readable_line() {
    use crate::audit::{AuditEvent, EventKind, Outcome};
    let event = AuditEvent {
        spiffe_id: Some("spiffe://example.org/agent".into()),
        pid: Some(42),
        task_id: Some("tsk-1".into()),
        audience: Some("mcp://jira".into()),
        tools: vec!["jira.search".into(), "jira.read".into()],
        policy_ids: vec!["p0".into()],
        reason: Some("tool \"x\"\n\u{1b}[2J".into()),
        ..AuditEvent::new(EventKind::Deny, Outcome::Deny)
    };
    let record = AuditRecord {
        seq: 7,
        time: at(1_700_000_000).0,
        prev: "0".repeat(64),
        event,
        line: String::new(),
    };
    let mut text = String::new();
    StoredRecord(&record)
        .readable_text(&mut text, at(0).0)
        .unwrap();
    assert_eq!(
        text,
        "2023-11-14T22:13:20Z       7  deny            deny   spiffe://example.org/agent  pid=42 \
         task=tsk-1 audience=mcp://jira tools=jira.search,jira.read policies=p0 \
         reason=\"tool \\\"x\\\"\\n\\u{1b}[2J\"\n"
    );
}

#[test]
fn caller_values_cannot_forge_fields_of_an_audit_line() {
    assert_eq!(field_value("mcp://jira", false), "mcp://jira");
    assert_eq!(
        field_value("a b token=FORGED", false),
        "\"a b token=FORGED\""
    );
    assert_eq!(field_value("x\u{1b}[2J", false), "\"x\\u{1b}[2J\"");
    assert_eq!(field_value("a,b", false), "a,b");
    assert_eq!(field_value("a,b", true), "\"a,b\"");
    assert_eq!(field_value("", false), "\"\"");
}

#[test]
fn agent_strings_cannot_drive_the_terminal() {
    assert_eq!(printable("spiffe://a/b"), "spiffe://a/b");
    assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\n");
}

fn entry(id: &str, source: &'static str, selectors: &[&str]) -> EntryView {
    EntryView {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{id}"),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        source,
        revision: 1,
        x509_svid_ttl: Some(Ttl(Duration::from_secs(600))),
        jwt_svid_ttl: None,
        dns_names: Vec::new(),
        hint: String::new(),
        federates_with: Vec::new(),
        created_at: Some(at(0)),
        updated_at: None,
    }
}

#[test]
fn entry_tables_align_and_show_defaults() {
    let report = EntriesReport {
        entries: vec![
            entry("cfg-1", "config", &["unix:uid:1"]),
            entry("ent-long-id", "api", &["unix:uid:2", "unix:gid:2"]),
        ],
    };
    let mut text = String::new();
    report.readable(&mut text, at(0).0).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "ID           SPIFFE ID                         SELECTORS              SOURCE  X509 TTL  JWT TTL  HINT",
            "cfg-1        spiffe://example.org/cfg-1        unix:uid:1             config  10m       default  -",
            "ent-long-id  spiffe://example.org/ent-long-id  unix:uid:2,unix:gid:2  api     10m       default  -",
        ]
    );
    let mut text = String::new();
    report.entries[0].readable(&mut text, at(60).0).unwrap();
    assert!(text.starts_with("ID:              cfg-1\n"), "{text}");
    assert!(text.contains("Hint:            (none)"), "{text}");
    assert!(
        text.contains("Created:         1970-01-01T00:00:00Z (1m ago)"),
        "{text}"
    );
    assert!(text.contains("Updated:         (unknown)"), "{text}");
    let mut empty = String::new();
    EntriesReport { entries: vec![] }
        .readable(&mut empty, at(0).0)
        .unwrap();
    assert_eq!(empty, "No entries\n");
}

#[test]
fn svid_tables_have_a_line_per_holder_or_a_dash() {
    let svid = |id: &str, holders: Vec<HolderView>| IssuedSvidView {
        spiffe_id: format!("spiffe://example.org/{id}"),
        serial: "0a".into(),
        not_before: Some(at(0)),
        not_after: Some(at(3600)),
        entry_id: format!("ent-{id}"),
        holders,
    };
    let holder = |pid: i32| HolderView {
        pid,
        uid: 0,
        executable: "/usr/bin/x".into(),
        selectors: Vec::new(),
        since: None,
    };
    let report = SvidsReport {
        svids: vec![svid("a", vec![holder(7), holder(8)]), svid("b", Vec::new())],
    };
    let mut text = String::new();
    report.readable(&mut text, at(0).0).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("SPIFFE ID"), "{text}");
    assert!(lines[1].contains("ent-a  7    0    /usr/bin/x"), "{text}");
    assert!(lines[2].contains("ent-a  8    0    /usr/bin/x"), "{text}");
    assert!(lines[1].contains("1970-01-01T01:00:00Z (in 1h)"), "{text}");
    assert!(lines[3].starts_with("spiffe://example.org/b"), "{text}");
    assert!(lines[3].ends_with("ent-b  -    -    -"), "{text}");
}

#[test]
fn health_and_reload_lines_count_in_words() {
    let health = |entries, open_streams| HealthReport {
        serving: true,
        trust_domain: "example.org".into(),
        entries,
        open_streams,
        version: "0.1.0".into(),
        problems: Vec::new(),
        server: String::new(),
    };
    let mut text = String::new();
    health(1, 2).readable(&mut text, at(0).0).unwrap();
    assert_eq!(
        text,
        "serving: trust domain example.org, 1 entry, 2 open streams\n"
    );
    let mut text = String::new();
    health(3, 1).readable(&mut text, at(0).0).unwrap();
    assert_eq!(
        text,
        "serving: trust domain example.org, 3 entries, 1 open stream\n"
    );
    let json = serde_json::to_value(health(3, 1)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"serving": true, "trust_domain": "example.org",
            "entries": 3, "open_streams": 1, "version": "0.1.0", "problems": []})
    );
    // A fleet agent says how its link to the server is.
    let fleet = HealthReport {
        server: "spiffe://fleet.test/tether/node/a, connected to 10.0.0.1:8081".into(),
        ..health(1, 0)
    };
    let mut text = String::new();
    fleet.readable(&mut text, at(0).0).unwrap();
    assert_eq!(
        text,
        "serving: trust domain example.org, 1 entry, 0 open streams\n  server: spiffe://fleet.test/tether/node/a, connected to 10.0.0.1:8081\n"
    );
}

#[test]
fn policy_reports_read_like_compiler_output() {
    let problem = PolicyProblemView {
        file: "policies/a.cedar".into(),
        line: 3,
        column: 7,
        reason: "unexpected token `}`\u{1b}".into(),
    };
    assert_eq!(
        problem.to_string(),
        "policies/a.cedar:3:7: unexpected token `}`\\u{1b}"
    );
    let valid = |policies, files| PolicyValidation {
        valid: true,
        files,
        policies,
        ids: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let mut text = String::new();
    valid(7, 5).readable(&mut text, at(0).0).unwrap();
    assert_eq!(text, "7 policies in 5 files: valid\n");
    let mut text = String::new();
    valid(1, 1).readable(&mut text, at(0).0).unwrap();
    assert_eq!(text, "1 policy in 1 file: valid\n");

    let decision = |decision, policies: &[&str], reason: Option<&str>| PolicyDecisionView {
        decision,
        policies: policies.iter().map(|p| (*p).to_owned()).collect(),
        reason: reason.map(str::to_owned),
    };
    let mut text = String::new();
    decision("allow", &["a", "b"], None)
        .readable(&mut text, at(0).0)
        .unwrap();
    assert_eq!(text, "allow (policies: a, b)\n");
    let mut text = String::new();
    let denied = decision("deny", &["c"], Some("forbidden by c"));
    denied.readable(&mut text, at(0).0).unwrap();
    assert_eq!(text, "deny: forbidden by c (policies: c)\n");
    let mut text = String::new();
    decision("deny", &[], Some("no policy permits x"))
        .readable(&mut text, at(0).0)
        .unwrap();
    assert_eq!(text, "deny: no policy permits x\n");
    assert_eq!(
        serde_json::to_value(&denied).unwrap(),
        serde_json::json!({"decision": "deny", "policies": ["c"], "reason": "forbidden by c"})
    );
}

fn task(id: &str, end_reason: Option<&str>) -> TaskView {
    TaskView {
        id: id.into(),
        spiffe_id: "spiffe://example.org/agent".into(),
        entry_id: "cfg-1".into(),
        owner_pid: 4242,
        owner_uid: 1000,
        owner_executable: "/usr/bin/tether".into(),
        audience: "spiffe://example.org/mcp".into(),
        intent: "triage".into(),
        tools: vec!["jira.read".into(), "jira.search".into()],
        bound: false,
        created_at: Some(at(0)),
        deadline: Some(at(240)),
        tokens_issued: 2,
        state: if end_reason.is_some() {
            "ended"
        } else {
            "active"
        }
        .into(),
        end_reason: end_reason.map(str::to_owned),
        ended_at: end_reason.map(|_| at(60)),
    }
}

#[test]
fn task_tables_show_owner_deadline_and_state() {
    let report = TasksReport {
        tasks: vec![task("tsk-a", None), task("tsk-b", Some("revoked"))],
    };
    let mut text = String::new();
    report.readable(&mut text, at(0).0).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "ID     SPIFFE ID                   OWNER PID  AUDIENCE                  TOOLS                  DEADLINE                      TOKENS  STATE",
            "tsk-a  spiffe://example.org/agent  4242       spiffe://example.org/mcp  jira.read,jira.search  1970-01-01T00:04:00Z (in 4m)  2       active",
            "tsk-b  spiffe://example.org/agent  4242       spiffe://example.org/mcp  jira.read,jira.search  1970-01-01T00:04:00Z (in 4m)  2       ended: revoked",
        ]
    );
    let mut shown = String::new();
    report.tasks[1].readable(&mut shown, at(120).0).unwrap();
    assert!(
        shown.contains("Owner:        pid 4242, uid 1000, /usr/bin/tether"),
        "{shown}"
    );
    assert!(
        shown.contains("State:        ended: revoked, 1970-01-01T00:01:00Z (1m ago)"),
        "{shown}"
    );
    let mut empty = String::new();
    TasksReport { tasks: vec![] }
        .readable(&mut empty, at(0).0)
        .unwrap();
    assert_eq!(empty, "No tasks\n");
}

#[test]
fn task_token_validations_show_the_actor_chain() {
    let report = TaskTokenValidation {
        valid: true,
        reason: None,
        spiffe_id: "spiffe://example.org/agent".into(),
        task_id: "tsk-1".into(),
        actors: vec![
            "spiffe://example.org/b".into(),
            "spiffe://example.org/a".into(),
        ],
        claims: serde_json::json!({"txn": "tsk-1"}),
    };
    let mut text = String::new();
    report.readable(&mut text, at(0).0).unwrap();
    assert!(
        text.starts_with("valid\nSPIFFE ID:    spiffe://example.org/agent\nTask:         tsk-1\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "Actor chain:  spiffe://example.org/b, spiffe://example.org/a (newest first)"
        ),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["reason"], serde_json::Value::Null);
    assert_eq!(json["actors"][0], "spiffe://example.org/b");
}

#[test]
fn fetch_x509_json_field_names_are_stable() {
    let output = FetchX509Output {
        report: X509Report {
            svids: vec![X509SvidSummary {
                spiffe_id: "spiffe://example.org/a".into(),
                hint: "a".into(),
                serial: "1f".into(),
                not_before: at(0),
                not_after: at(3600),
                dns_names: vec!["a.example.org".into()],
                chain_length: 1,
            }],
            trust_domain_cas: 1,
            federated_bundles: vec![FederatedBundleSummary {
                trust_domain: "partner.example".into(),
                cas: 2,
            }],
        },
        files_written: vec!["/tmp/svid.0.pem".into()],
    };
    let json = serde_json::to_value(&output).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "svids": [{
                "spiffe_id": "spiffe://example.org/a",
                "hint": "a",
                "serial": "1f",
                "not_before": "1970-01-01T00:00:00Z",
                "not_after": "1970-01-01T01:00:00Z",
                "dns_names": ["a.example.org"],
                "chain_length": 1,
            }],
            "trust_domain_cas": 1,
            "federated_bundles": [{"trust_domain": "partner.example", "cas": 2}],
            "files_written": ["/tmp/svid.0.pem"],
        })
    );
    let mut text = String::new();
    output.readable(&mut text, at(60).0).unwrap();
    assert!(
        text.contains("SPIFFE ID:         spiffe://example.org/a"),
        "{text}"
    );
    assert!(text.contains("1970-01-01T01:00:00Z (in 59m)"), "{text}");
    assert!(text.contains("partner.example (2 CAs)"), "{text}");
    assert!(text.contains("Wrote /tmp/svid.0.pem"), "{text}");
}

#[test]
fn every_render_prints_its_serde_form_as_json() {
    let report = DeletedReport {
        deleted: "ent-1".into(),
    };
    assert_eq!(report.json_line().unwrap(), r#"{"deleted":"ent-1"}"#);
    let mut text = String::new();
    report.readable_text(&mut text, at(0).0).unwrap();
    assert_eq!(text, "Deleted entry ent-1\n");

    let document = Document(serde_json::json!({"keys": [{"kid": "k1"}]}));
    assert_eq!(document.json_line().unwrap(), r#"{"keys":[{"kid":"k1"}]}"#);
    let mut text = String::new();
    document.readable_text(&mut text, at(0).0).unwrap();
    assert!(text.starts_with("{\n  \"keys\": ["), "{text}");
}

#[test]
fn audit_records_print_their_stored_line_as_json() {
    use crate::audit::{AuditEvent, EventKind, Outcome};
    // Not what serde would write for the record: the stored line, as is,
    // so that what a script reads is what the chain hashes.
    let line = r#"{"seq":3,"time":"2023-11-14T22:13:20Z","prev":"00","event":"deny"}"#;
    let record = AuditRecord {
        seq: 3,
        time: at(1_700_000_000).0,
        prev: "00".into(),
        event: AuditEvent::new(EventKind::Deny, Outcome::Deny),
        line: line.into(),
    };
    assert_eq!(StoredRecord(&record).json_line().unwrap(), line);
}
