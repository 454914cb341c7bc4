//! Issue 15, finding 5: what the records about one uid's processes can take
//! of the audit trail is bounded (`audit.caller_bytes_per_second`, burst
//! `audit.caller_burst_bytes`). Past it that uid's requests are refused
//! before any work (ResourceExhausted: no task made, nothing recorded but
//! one note per 10 s), and every other uid is served from its own budget.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use tether::audit::{AuditRecord, EventKind, ReadFilter};
use tokio::time::Instant;

use crate::common::{self, TestAgent};

const RATE: u64 = 1024;
const BURST: u64 = 65536;
/// A uid with an entry of its own, for the test's second caller.
const OTHER: u32 = 4_343_434;

fn records(agent: &TestAgent) -> Vec<AuditRecord> {
    tether::audit::read(&agent.dir.path().join("data/audit"), &ReadFilter::default()).unwrap()
}

// The agent runs in this process: the blocking CLI call needs a second
// worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (a client as another uid): scripts/test runs it"]
async fn one_uid_cannot_write_more_than_its_audit_budget_and_others_are_served() {
    common::require_root("running a client as another uid");
    let agent = TestAgent::start(&format!(
        "[audit]\ncaller_bytes_per_second = {RATE}\ncaller_burst_bytes = {BURST}\n{}\
         [[entries]]\nspiffe_id = \"spiffe://example.org/other\"\nselectors = [\"unix:uid:{OTHER}\"]\n",
        common::entry_for_me("flood", "flood")
    ))
    .await;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let me = common::uid();
    let client = agent.spiffe_client().await;

    // A new audience each time, as the finding's flood did: no two records
    // alike, so none is counted as a repeat.
    let started = Instant::now();
    let mut refused = None;
    for i in 0..10_000 {
        let audience = format!("https://{i}.{}.example", "a".repeat(200));
        match client.fetch_jwt_svid(&[audience.as_str()], None).await {
            Ok(_) => {}
            Err(error) => {
                refused = Some(error.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the flood is refused before 10,000 records");
    assert!(refused.contains("over its audit budget"), "{refused}");
    // A task is refused before it is made: no task, no record of it (a
    // refused BeginTask used to leave a stored, revoked task and its
    // uncharged record behind).
    let begun = agent
        .tasks()
        .await
        .begin_task(tether::proto::task::BeginTaskRequest {
            audience: "https://mcp.example/jira".into(),
            intent: "i".repeat(1000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(begun.code(), tonic::Code::ResourceExhausted, "{begun:?}");

    // Another uid is served meanwhile, from its own budget.
    let other = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "api",
            "fetch",
            "jwt",
            "--audience",
            "https://api.example",
            "--socket",
        ])
        .arg(&agent.socket)
        .env_clear()
        .uid(OTHER)
        .gid(OTHER)
        .output()
        .unwrap();
    assert!(other.status.success(), "{other:?}");
    // And so is this uid again, once its budget has refilled for a record.
    common::eventually("the budget to refill for a record", async || {
        let Err(error) = client
            .fetch_jwt_svid(&["https://later.example"], None)
            .await
        else {
            return true;
        };
        assert!(
            error.to_string().contains("over its audit budget"),
            "{error}"
        );
        false
    })
    .await;

    agent.running().audit().flush().await;
    let elapsed = started.elapsed().as_secs_f64();
    let records = records(&agent);
    let charged: u64 = records
        .iter()
        .filter(|r| r.event.uid == Some(me))
        .filter(|r| {
            !r.event
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("audit budget")
        })
        .map(|r| r.line.len() as u64 + 1)
        .sum();
    // What the uid made the agent write is within its budget over the run
    // (and the one record of the last request admitted).
    let bound = BURST + (RATE as f64 * elapsed) as u64 + 65536;
    assert!(charged <= bound, "{charged} bytes > {bound} bytes");
    let note = records
        .iter()
        .find(|r| r.event.event == EventKind::Deny && r.event.uid == Some(me))
        .expect("the refusals are recorded");
    assert!(
        note.event
            .reason
            .as_deref()
            .unwrap()
            .contains(&format!("audit budget of uid {me} exhausted")),
        "{note:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r.event.uid == Some(OTHER) && r.event.event == EventKind::IssueJwt)
    );
    agent.stop().await;
}
