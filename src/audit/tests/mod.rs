//! Tests across the writer, recovery, `verify` and the reader: each writes
//! a real trail through [`AuditLog`] and checks it from the files.
//!
//! No test depends on timing: waits are for a condition, with a timeout
//! only as a guard against hanging.

use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::testing::eventually;

/// Longest any wait may take before the test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

/// The agent's audit key in every test of this process: a trail reopened
/// by a test is reopened by "the same agent".
fn key() -> Arc<SigningKey> {
    static KEY: std::sync::LazyLock<Arc<SigningKey>> =
        std::sync::LazyLock::new(|| Arc::new(SigningKey::generate().unwrap().0));
    Arc::clone(&KEY)
}

/// [`super::verify`] with the seals checked: every trail here is written
/// by "the same agent".
fn verify(dir: &Path) -> Result<VerifyReport, AuditError> {
    super::verify(dir, std::slice::from_ref(key().public_key()))
}

/// A writer running on the test's runtime.
struct Running {
    log: AuditLog,
    cancel: CancellationToken,
    job: JoinHandle<()>,
}

impl Running {
    fn start(dir: &Path, config: &AuditConfig) -> Self {
        let (log, writer) = AuditLog::open(dir, config, key()).unwrap();
        let cancel = CancellationToken::new();
        let job = tokio::spawn(writer.run(cancel.clone()));
        Self { log, cancel, job }
    }

    async fn flush(&self) {
        guarded(self.log.flush()).await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        guarded(self.job).await.unwrap();
    }
}

async fn guarded<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(GUARD, future)
        .await
        .expect("timed out (guard)")
}

fn config() -> AuditConfig {
    AuditConfig {
        flush_interval: Duration::from_millis(5),
        ..AuditConfig::default()
    }
}

fn small_files() -> AuditConfig {
    AuditConfig {
        max_file_bytes: 4096,
        ..config()
    }
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        spiffe_id: Some(format!("spiffe://example.org/w{i}")),
        pid: Some(1000 + i as i32),
        uid: Some(1000),
        task_id: Some(format!("task-{}", i % 3)),
        audience: Some("mcp://jira".into()),
        tools: vec!["jira.search".into()],
        intent: Some("triage the incident queue ".repeat(8)),
        reason: Some(format!("reason {i}")),
        policy_ids: vec!["p0".into()],
        token_id: Some(format!("jti-{i}")),
        ..AuditEvent::new(EventKind::IssueJwt, Outcome::Allow)
    }
}

/// Records events `from..to` and waits until they are durable.
async fn record_all(running: &Running, from: usize, to: usize) {
    for i in from..to {
        running.log.record(event(i)).unwrap();
    }
    running.flush().await;
}

/// A trail of `n` records written and closed.
async fn trail(dir: &Path, config: &AuditConfig, n: usize) {
    let running = Running::start(dir, config);
    record_all(&running, 0, n).await;
    running.stop().await;
}

fn segment(dir: &Path, number: u32) -> PathBuf {
    dir.join(files::segment_name(number))
}

fn lines_of(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{}",
        path.display()
    );
    text.lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `verify` must fail: (file name, line, problem).
fn broken_at(dir: &Path) -> (String, u64, String) {
    match verify(dir) {
        Err(AuditError::Broken {
            file,
            line,
            problem,
        }) => (
            file.file_name().unwrap().to_string_lossy().into_owned(),
            line,
            problem,
        ),
        other => panic!("expected a broken trail, got {other:?}"),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn records_chain_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let running = Running::start(&dir, &config());
    // A new trail has HEAD from the start, and verifies empty.
    let empty = verify(&dir).unwrap();
    assert_eq!((empty.records, empty.files, empty.head_seq), (0, 0, 0));
    assert_eq!(empty.head_hash, "0".repeat(64));

    record_all(&running, 0, 5).await;
    assert_eq!(running.log.problem(), None);

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&segment(&dir, 1)), 0o600);
    assert_eq!(mode(&dir.join("HEAD")), 0o600);

    // The format, checked from the bytes with an independent hash.
    let lines = lines_of(&segment(&dir, 1));
    assert_eq!(lines.len(), 5);
    let mut prev = "0".repeat(64);
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!("{{\"seq\":{},\"time\":\"", i + 1)),
            "{line}"
        );
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["prev"], prev.as_str());
        assert_eq!(json["event"], "issue-jwt");
        assert_eq!(json["decision"], "allow");
        assert_eq!(json["reason"], format!("reason {i}"));
        assert!(json.get("entry_id").is_none(), "absent fields are left out");
        let time = json["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.contains('.'), "{time}");
        prev = sha256_hex(line.as_bytes());
    }
    let head = fs::read_to_string(dir.join("HEAD")).unwrap();
    assert!(
        head.starts_with(&format!("{{\"seq\":5,\"hash\":\"{prev}\",\"time\":\""))
            && head.contains(&format!(
                ",\"seal\":{{\"key\":\"{}\",\"sig\":\"",
                key().id()
            ))
            && head.ends_with("\"}}\n"),
        "{head}"
    );

    let records = read(&dir, &ReadFilter::default()).unwrap();
    let events: Vec<AuditEvent> = records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(events, (0..5).map(event).collect::<Vec<_>>());
    assert_eq!(records[4].line, lines[4]);

    let report = verify(&dir).unwrap();
    assert_eq!(
        (
            report.records,
            report.files,
            report.head_seq,
            report.last_seq
        ),
        (5, 1, 5, 5)
    );
    assert_eq!(report.head_hash, prev);
    assert!(report.recoveries.is_empty() && !report.partial_tail);
    assert!(report.seals_checked);
    assert_eq!(
        report.sealed.map(|(key_id, _)| key_id).as_deref(),
        Some(key().id())
    );
    running.stop().await;

    // A restart continues the chain where it stopped.
    let running = Running::start(&dir, &config());
    record_all(&running, 5, 7).await;
    running.stop().await;
    let lines = lines_of(&segment(&dir, 1));
    assert_eq!(lines.len(), 7);
    assert!(lines[5].contains("\"seq\":6,\"time\":"));
    assert!(lines[5].contains(&format!("\"prev\":\"{prev}\"")));
    assert_eq!(verify(&dir).unwrap().head_seq, 7);
}

#[tokio::test]
async fn rotation_keeps_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trail(dir, &small_files(), 40).await;

    let segments = files::list_segments(dir).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let mut seq = 0;
    for (number, path) in &segments {
        let len = fs::metadata(path).unwrap().len();
        assert!(len <= 4096, "{number}: {len} bytes");
        for line in lines_of(path) {
            seq += 1;
            assert!(line.starts_with(&format!("{{\"seq\":{seq},")), "{line}");
        }
    }
    assert_eq!(seq, 40);
    let report = verify(dir).unwrap();
    assert_eq!(
        (report.records, report.files, report.head_seq),
        (40, segments.len(), 40)
    );

    // The first record of each later file chains to the last of the one
    // before.
    for pair in segments.windows(2) {
        let last = lines_of(&pair[0].1).pop().unwrap();
        let first = lines_of(&pair[1].1).remove(0);
        assert!(
            first.contains(&format!("\"prev\":\"{}\"", sha256_hex(last.as_bytes()))),
            "{first}"
        );
    }

    // A restart appends to the newest file and keeps rotating.
    trail(dir, &small_files(), 20).await;
    let report = verify(dir).unwrap();
    assert_eq!(report.records, 60);
    let seqs: Vec<u64> = read(dir, &ReadFilter::default())
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
}

#[tokio::test]
async fn cancelling_drains_and_syncs_what_is_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let running = Running::start(tmp.path(), &config());
    for i in 0..300 {
        running.log.record(event(i)).unwrap();
    }
    let log = running.log.clone();
    running.stop().await;
    assert_eq!(verify(tmp.path()).unwrap().head_seq, 300);
    // Stopped: recording refuses, flush returns, health says so.
    assert!(matches!(
        log.record(event(0)),
        Err(AuditUnavailable::Stopped)
    ));
    guarded(log.flush()).await;
    assert!(log.problem().unwrap().contains("stopped"));
}

/// Regression: an acknowledged record was only queued, and a kill -9 of
/// the agent could lose it. `written` resolves once it is in the file.
#[tokio::test]
async fn written_resolves_once_every_record_so_far_is_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        // No fsync within the test (10 s): written means written, not synced.
        flush_interval: Duration::from_secs(10),
        ..config()
    };
    let running = Running::start(tmp.path(), &config);
    for i in 0..50 {
        running.log.record(event(i)).unwrap();
        if i % 10 == 9 {
            guarded(running.log.written()).await.unwrap();
            assert_eq!(lines_of(&segment(tmp.path(), 1)).len(), i + 1);
        }
    }
    let log = running.log.clone();
    running.stop().await;
    // Stopped, with everything written: resolves.
    guarded(log.written()).await.unwrap();
}

#[tokio::test]
async fn a_torn_last_line_is_cut_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trail(dir, &config(), 3).await;
    let path = segment(dir, 1);
    let before = fs::read(&path).unwrap();
    let mut torn = before.clone();
    torn.extend_from_slice(b"{\"seq\":4,\"time\":\"2026-05-01T10:");
    fs::write(&path, &torn).unwrap();

    // Before the agent starts, verify sees a write that never finished past
    // HEAD: not a break.
    assert!(verify(dir).unwrap().partial_tail);

    let running = Running::start(dir, &config());
    record_all(&running, 3, 4).await;
    running.stop().await;

    let after = fs::read(&path).unwrap();
    assert_eq!(&after[..before.len()], &before[..], "complete records kept");
    let records = read(dir, &ReadFilter::default()).unwrap();
    assert_eq!(records.len(), 5);
    let recovered = &records[3];
    assert_eq!(recovered.seq, 4);
    assert_eq!(recovered.event.event, EventKind::AuditRecovered);
    assert_eq!(recovered.event.decision, Outcome::Info);
    let reason = recovered.event.reason.as_deref().unwrap();
    assert!(
        reason.contains(&format!("{}:4", path.display())) && reason.contains("cut"),
        "{reason}"
    );
    assert_eq!(records[4].event, event(3));

    let report = verify(dir).unwrap();
    assert_eq!(report.records, 5);
    assert_eq!(report.recoveries.len(), 1);
    assert_eq!(report.recoveries[0].line, 4);
}

/// Records in the [`Tampering`] trail: several files, the last with at
/// least three records.
const TAMPERED: usize = 32;

/// A trail of [`TAMPERED`] records in several files, and a way to check a damaged
/// copy of it.
struct Tampering {
    _tmp: tempfile::TempDir,
    original: PathBuf,
}

impl Tampering {
    async fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let original = tmp.path().join("original");
        trail(&original, &small_files(), TAMPERED).await;
        assert!(segment(&original, 3).exists());
        assert_eq!(verify(&original).unwrap().records, TAMPERED as u64);
        Self {
            _tmp: tmp,
            original,
        }
    }

    /// Verifies a copy after `damage`: (file name, line, problem).
    fn check(&self, damage: impl FnOnce(&Path)) -> (String, u64, String) {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&self.original, copy.path());
        damage(copy.path());
        broken_at(copy.path())
    }

    fn count(&self, number: u32) -> usize {
        lines_of(&segment(&self.original, number)).len()
    }
}

fn edit_line(dir: &Path, number: u32, line: usize, edit: impl FnOnce(&str) -> String) {
    let path = segment(dir, number);
    let mut lines = lines_of(&path);
    let edited = edit(&lines[line - 1]);
    assert_ne!(edited, lines[line - 1]);
    lines[line - 1] = edited;
    write_lines(&path, &lines);
}

#[tokio::test]
async fn verify_names_the_first_broken_place() {
    let t = Tampering::new().await;
    // The newest file, its name and its line count.
    let last = files::list_segments(&t.original).unwrap().last().unwrap().0;
    let (n1, n2, n_last) = (t.count(1), t.count(2), t.count(last));
    assert!(n1 >= 5 && n2 >= 2 && n_last >= 3, "{n1} {n2} {n_last}");
    let (f1, f2, f3, f_last) = (
        files::segment_name(1),
        files::segment_name(2),
        files::segment_name(3),
        files::segment_name(last),
    );
    let before_last = files::segment_name(last - 1);
    let n_before_last = t.count(last - 1);
    // The seq of line 2 of file 2.
    let s22 = n1 as u64 + 2;

    // One character of a field, in the middle of the trail.
    let (file, line, problem) = t.check(|d| {
        edit_line(d, 2, 2, |l| {
            l.replace(
                &format!("\"reason {}\"", s22 - 1),
                &format!("\"reason {}!\"", s22 - 1),
            )
        })
    });
    assert_eq!((file.as_str(), line), (f2.as_str(), 2), "{problem}");
    assert!(
        problem.contains(&format!("record seq {s22} was changed")),
        "{problem}"
    );

    // The first record, and the last one (only HEAD holds its hash).
    let (file, line, _) =
        t.check(|d| edit_line(d, 1, 1, |l| l.replace("\"pid\":1000", "\"pid\":1001")));
    assert_eq!((file.as_str(), line), (f1.as_str(), 1));
    let (file, line, problem) = t.check(|d| {
        edit_line(d, last, n_last, |l| {
            l.replace("\"decision\":\"allow\"", "\"decision\":\"deny\"")
        })
    });
    assert_eq!((file.as_str(), line), (f_last.as_str(), n_last as u64));
    assert!(problem.contains("does not match HEAD"), "{problem}");

    // A record's own prev field.
    let (file, line, problem) = t.check(|d| {
        edit_line(d, 1, 3, |l| {
            let at = l.find("\"prev\":\"").unwrap() + 8;
            let flipped = if &l[at..=at] == "0" { "1" } else { "0" };
            format!("{}{flipped}{}", &l[..at], &l[at + 1..])
        })
    });
    assert_eq!((file.as_str(), line), (f1.as_str(), 3), "{problem}");

    // A removed record.
    let (file, line, problem) = t.check(|d| {
        let path = segment(d, 1);
        let mut lines = lines_of(&path);
        lines.remove(3);
        write_lines(&path, &lines);
    });
    assert_eq!((file.as_str(), line), (f1.as_str(), 4));
    assert!(
        problem.contains("seq 5 follows seq 3: record 4 is missing"),
        "{problem}"
    );

    // Two records swapped.
    let (file, line, problem) = t.check(|d| {
        let path = segment(d, 1);
        let mut lines = lines_of(&path);
        lines.swap(3, 4);
        write_lines(&path, &lines);
    });
    assert_eq!((file.as_str(), line), (f1.as_str(), 4));
    assert!(problem.contains("seq 5 follows seq 3"), "{problem}");

    // A record repeated.
    let (file, line, problem) = t.check(|d| {
        let path = segment(d, 1);
        let mut lines = lines_of(&path);
        lines.insert(2, lines[1].clone());
        write_lines(&path, &lines);
    });
    assert_eq!((file.as_str(), line), (f1.as_str(), 3));
    assert!(problem.contains("out of order or repeated"), "{problem}");

    // A file removed from the middle.
    let (file, line, problem) = t.check(|d| fs::remove_file(segment(d, 2)).unwrap());
    assert_eq!((file.as_str(), line), (f3.as_str(), 1));
    assert!(problem.contains(&format!("{f2} is missing")), "{problem}");

    // The tail cut: two records, or the whole last file.
    let (file, line, problem) = t.check(|d| {
        let path = segment(d, last);
        let mut lines = lines_of(&path);
        lines.truncate(n_last - 2);
        write_lines(&path, &lines);
    });
    assert_eq!((file.as_str(), line), (f_last.as_str(), n_last as u64 - 1));
    assert!(
        problem.contains(
            &format!(
                "the trail ends at seq {} but HEAD records seq {TAMPERED}: records {} to {TAMPERED} are missing",
                TAMPERED - 2,
                TAMPERED - 1
            )
        ),
        "{problem}"
    );
    let (file, line, problem) = t.check(|d| fs::remove_file(segment(d, last)).unwrap());
    assert_eq!(
        (file.as_str(), line),
        (before_last.as_str(), n_before_last as u64 + 1)
    );
    assert!(problem.contains("tail was cut"), "{problem}");

    // HEAD removed or damaged.
    let (file, line, problem) = t.check(|d| fs::remove_file(d.join("HEAD")).unwrap());
    assert_eq!((file.as_str(), line), ("HEAD", 1));
    assert!(problem.contains("HEAD is missing"), "{problem}");
    let (file, _, problem) = t.check(|d| fs::write(d.join("HEAD"), "{}\n").unwrap());
    assert_eq!(file, "HEAD", "{problem}");

    // Lines that are not records.
    let (file, line, problem) = t.check(|d| edit_line(d, 2, 1, |_| "garbage".into()));
    assert_eq!((file.as_str(), line), (f2.as_str(), 1));
    assert!(problem.contains("not an audit record"), "{problem}");
    let (file, line, problem) = t.check(|d| edit_line(d, 1, 2, |_| "x".repeat(MAX_LINE + 1)));
    assert_eq!((file.as_str(), line), (f1.as_str(), 2));
    assert!(problem.contains("longer than any record"), "{problem}");

    // An incomplete line in a file that is not the newest.
    let (file, line, problem) = t.check(|d| {
        let path = segment(d, 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes.pop();
        fs::write(&path, bytes).unwrap();
    });
    assert_eq!((file.as_str(), line), (f1.as_str(), n1 as u64));
    assert!(problem.contains("incomplete line"), "{problem}");
}

#[tokio::test]
async fn a_cut_tail_stays_visible_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trail(dir, &config(), 10).await;
    let path = segment(dir, 1);
    let mut lines = lines_of(&path);
    lines.truncate(7);
    write_lines(&path, &lines);

    // The agent still starts; its first record says what is missing, and
    // the chain continues from HEAD, so the gap stays in the trail.
    trail(dir, &config(), 1).await;
    let records = read(dir, &ReadFilter::default()).unwrap();
    let recovered = &records[7];
    assert_eq!(
        (recovered.seq, recovered.event.event),
        (11, EventKind::AuditRecovered)
    );
    let reason = recovered.event.reason.as_deref().unwrap();
    assert!(reason.contains("records 8 to 10 are missing"), "{reason}");
    // Damage, not a crash's leftovers: a denial.
    assert_eq!(recovered.event.decision, Outcome::Deny);
    assert_eq!(records[8].seq, 12);
    assert_eq!(&lines_of(&path)[..7], &lines[..], "nothing rewritten");

    let (file, line, problem) = broken_at(dir);
    assert_eq!((file.as_str(), line), (files::segment_name(1).as_str(), 8));
    assert!(
        problem.contains("seq 11 follows seq 7: records 8 to 10 are missing"),
        "{problem}"
    );
}

#[tokio::test]
async fn records_past_head_are_a_batch_not_yet_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trail(dir, &config(), 5).await;
    let head = fs::read(dir.join("HEAD")).unwrap();
    trail(dir, &config(), 3).await;
    // As if the writer died after writing 6 to 8 and before syncing them.
    fs::write(dir.join("HEAD"), &head).unwrap();

    let report = verify(dir).unwrap();
    assert_eq!((report.head_seq, report.last_seq), (5, 8));

    // A start keeps them (they were written and acknowledged) without a
    // recovery record, and syncs them.
    trail(dir, &config(), 1).await;
    let report = verify(dir).unwrap();
    assert_eq!(
        (report.head_seq, report.last_seq, report.records),
        (9, 9, 9)
    );
    assert!(report.recoveries.is_empty());
}

#[tokio::test]
async fn a_full_queue_refuses_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        queue: 2,
        ..config()
    };
    let (log, writer) = AuditLog::open(tmp.path(), &config, key()).unwrap();
    log.record(event(0)).unwrap();
    log.record(event(1)).unwrap();
    assert!(matches!(
        log.record(event(2)),
        Err(AuditUnavailable::QueueFull { capacity: 2 })
    ));
    let problem = log.problem().unwrap();
    assert!(problem.contains("queue is full"), "{problem}");

    // Once the writer runs, the queue drains and recording works again.
    let cancel = CancellationToken::new();
    let job = tokio::spawn(writer.run(cancel.clone()));
    guarded(log.flush()).await;
    assert_eq!(log.problem(), None);
    log.record(event(3)).unwrap();
    guarded(log.flush()).await;
    cancel.cancel();
    guarded(job).await.unwrap();
    let reasons: Vec<String> = read(tmp.path(), &ReadFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.event.reason.unwrap())
        .collect();
    assert_eq!(reasons, ["reason 0", "reason 1", "reason 3"]);
}

#[tokio::test]
async fn a_writer_that_cannot_sync_head_fails_closed_then_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let running = Running::start(dir, &config());
    record_all(&running, 0, 1).await;

    // Root ignores permission bits: a directory where the writer must put
    // a file stops it.
    let blocker = dir.join(files::HEAD_TMP_FILE);
    fs::create_dir(&blocker).unwrap();
    running.log.record(event(1)).unwrap();
    eventually("the writer to report a problem", || {
        running.log.problem().is_some()
    })
    .await;
    let problem = running.log.problem().unwrap();
    assert!(
        problem.contains(&blocker.display().to_string()) && problem.contains("retrying"),
        "{problem}"
    );
    match running.log.record(event(2)) {
        Err(error @ AuditUnavailable::Failed { .. }) => {
            let text = crate::error::chain(&error);
            assert!(text.contains(".HEAD.tmp"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    fs::remove_dir(&blocker).unwrap();
    eventually("the writer to recover", || running.log.problem().is_none()).await;
    running.log.record(event(3)).unwrap();
    running.flush().await;
    running.stop().await;

    let reasons: Vec<String> = read(dir, &ReadFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.event.reason.unwrap())
        .collect();
    assert_eq!(reasons, ["reason 0", "reason 1", "reason 3"]);
    assert_eq!(verify(dir).unwrap().head_seq, 3);
}

#[tokio::test]
async fn a_writer_that_cannot_create_a_file_fails_closed_then_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let running = Running::start(dir, &small_files());
    record_all(&running, 0, 1).await;
    let blocker = segment(dir, 2);
    fs::create_dir(&blocker).unwrap();

    // Enough to need the second file. The record whose write found the
    // file missing is refused, yet kept: what it records may have happened
    // (a change, an end), so it is written once the file can be created.
    // Nothing after it is taken.
    let mut written = 1;
    let kept = loop {
        match running.log.record(event(written)) {
            Ok(()) => written += 1,
            Err(AuditUnavailable::Failed { .. }) => break written + 1,
            Err(other) => panic!("expected a failed write, got {other:?}"),
        }
        assert!(written < 1000, "the second file was never needed");
    };
    let problem = running.log.problem().unwrap();
    assert!(
        problem.contains(&blocker.display().to_string()),
        "{problem}"
    );
    assert!(running.log.record(event(999)).is_err());
    assert!(guarded(running.log.written()).await.is_err());

    fs::remove_dir(&blocker).unwrap();
    eventually("the writer to recover", || running.log.problem().is_none()).await;
    running.flush().await;
    running.stop().await;

    let report = verify(dir).unwrap();
    assert_eq!(report.records, kept as u64);
    assert!(report.files >= 2);
    let reasons: Vec<String> = read(dir, &ReadFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.event.reason.unwrap())
        .collect();
    assert_eq!(
        reasons,
        (0..kept).map(|i| format!("reason {i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn opening_refuses_what_it_cannot_own() {
    let tmp = tempfile::tempdir().unwrap();

    // Not a directory, or under a file.
    let file = tmp.path().join("file");
    fs::write(&file, "").unwrap();
    for path in [file.clone(), file.join("audit")] {
        let error = AuditLog::open(&path, &config(), key()).unwrap_err();
        assert!(
            error.to_string().contains(&file.display().to_string()),
            "{error}"
        );
    }

    // Writable by others, and not empty (an empty one of its own it would
    // make private, as a Kubernetes emptyDir).
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::write(open.join("planted"), "").unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let error = AuditLog::open(&open, &config(), key()).unwrap_err();
    assert!(
        matches!(
            error,
            AuditError::Untrusted(TrustedFsError::Mode { mode: 0o777, .. })
        ),
        "{error}"
    );

    // Held by another writer.
    let dir = tmp.path().join("audit");
    let running = Running::start(&dir, &config());
    let error = AuditLog::open(&dir, &config(), key()).unwrap_err();
    assert!(matches!(error, AuditError::Locked { .. }), "{error}");
    running.stop().await;
    Running::start(&dir, &config()).stop().await;

    // Bad settings name their key.
    let error = AuditLog::open(
        &dir,
        &AuditConfig {
            queue: 0,
            ..config()
        },
        key(),
    )
    .unwrap_err();
    assert!(error.to_string().starts_with("audit.queue"), "{error}");
}

#[tokio::test]
async fn long_fields_are_cut_to_fit_a_line() {
    let tmp = tempfile::tempdir().unwrap();
    let running = Running::start(tmp.path(), &config());
    let long = AuditEvent {
        intent: Some("x".repeat(300_000)),
        reason: Some("denied".into()),
        ..AuditEvent::new(EventKind::TaskBegin, Outcome::Deny)
    };
    running.log.record(long).unwrap();
    running.flush().await;
    running.stop().await;

    let line = lines_of(&segment(tmp.path(), 1)).remove(0);
    assert!(line.len() <= MAX_LINE, "{}", line.len());
    let record = read(tmp.path(), &ReadFilter::default()).unwrap().remove(0);
    assert_eq!(record.event.reason.as_deref(), Some("denied"));
    assert!(
        record
            .event
            .intent
            .unwrap()
            .ends_with("…[cut from 300000 bytes]")
    );
    verify(tmp.path()).unwrap();
}

#[tokio::test]
async fn the_reader_filters_and_follows_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let running = Running::start(dir, &small_files());
    record_all(&running, 0, 6).await;

    let mut all = AuditReader::new(dir, ReadFilter::default());
    let mut task = AuditReader::new(
        dir,
        ReadFilter {
            task_id: Some("task-1".into()),
            ..ReadFilter::default()
        },
    );
    let drain = |reader: &mut AuditReader| {
        let mut seqs = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            seqs.push(record.seq);
        }
        seqs
    };
    assert_eq!(drain(&mut all), [1, 2, 3, 4, 5, 6]);
    assert_eq!(drain(&mut task), [2, 5]);

    // More records, over several new files: the same readers continue.
    record_all(&running, 6, 40).await;
    running.stop().await;
    assert!(segment(dir, 3).exists());
    assert_eq!(drain(&mut all), (7..=40).collect::<Vec<u64>>());
    assert_eq!(
        drain(&mut task),
        (7..=40).filter(|s| (s - 1) % 3 == 1).collect::<Vec<u64>>()
    );

    // By subject or actor, and by time.
    let by_id = read(
        dir,
        &ReadFilter {
            spiffe_id: Some("spiffe://example.org/w7".into()),
            ..ReadFilter::default()
        },
    )
    .unwrap();
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].seq, 8);
    let future = read(
        dir,
        &ReadFilter {
            since: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
            ..ReadFilter::default()
        },
    )
    .unwrap();
    assert!(future.is_empty());

    // A line that is not a record is named, and reading goes on past it.
    edit_line(dir, 1, 2, |_| "garbage".into());
    let mut reader = AuditReader::new(dir, ReadFilter::default());
    assert_eq!(reader.next_record().unwrap().unwrap().seq, 1);
    match reader.next_record() {
        Err(AuditError::Broken {
            line: 2, problem, ..
        }) => {
            assert!(problem.contains("not an audit record"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reader.next_record().unwrap().unwrap().seq, 3);
}

#[test]
fn handles_cross_threads() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    fn sent<T: Send + 'static>() {}
    shared::<AuditLog>();
    shared::<AuditUnavailable>();
    sent::<AuditWriter>();
}

#[test]
fn config_defaults_and_bounds() {
    let defaults = AuditConfig::default();
    assert_eq!(defaults.max_file_bytes, 64 * 1024 * 1024);
    assert_eq!(defaults.flush_interval, Duration::from_millis(50));
    assert_eq!(defaults.queue, 16384);
    assert!(!defaults.stdout && defaults.dir.is_none());
    defaults.validate().unwrap();

    for (config, key) in [
        (
            AuditConfig {
                dir: Some("relative".into()),
                ..AuditConfig::default()
            },
            "audit.dir",
        ),
        (
            AuditConfig {
                max_file_bytes: 4095,
                ..AuditConfig::default()
            },
            "audit.max_file_bytes",
        ),
        (
            AuditConfig {
                flush_interval: Duration::ZERO,
                ..AuditConfig::default()
            },
            "audit.flush_interval",
        ),
        (
            AuditConfig {
                flush_interval: Duration::from_secs(11),
                ..AuditConfig::default()
            },
            "audit.flush_interval",
        ),
        (
            AuditConfig {
                queue: 0,
                ..AuditConfig::default()
            },
            "audit.queue",
        ),
    ] {
        assert_eq!(config.validate().unwrap_err().0, key);
    }
    let parsed: AuditConfig = toml::from_str("flush_interval = \"20ms\"\nstdout = true").unwrap();
    assert_eq!(parsed.flush_interval, Duration::from_millis(20));
    assert!(parsed.stdout);
    assert!(toml::from_str::<AuditConfig>("bogus = 1").is_err());
}

#[tokio::test]
async fn identical_denials_are_one_record_and_then_one_count() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let running = Running::start(&dir, &config());
    let denial = AuditEvent {
        pid: Some(7),
        audience: Some("api".into()),
        reason: Some("token expired".into()),
        ..AuditEvent::new(EventKind::Validate, Outcome::Deny)
    };
    for _ in 0..50 {
        running.log.record(denial.clone()).unwrap();
    }
    running.flush().await;
    assert_eq!(read(&dir, &ReadFilter::default()).unwrap().len(), 1);
    // The interval over, the next record brings the count with it. (A
    // real wait: the crate's tokio has no paused clock.)
    tokio::time::sleep(repeats::INTERVAL + Duration::from_millis(100)).await;
    running
        .log
        .record(AuditEvent::new(EventKind::Validate, Outcome::Allow))
        .unwrap();
    running.flush().await;
    let records = read(&dir, &ReadFilter::default()).unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[1].event.repeated, Some(49));
    assert_eq!(
        records[1].event,
        AuditEvent {
            repeated: Some(49),
            ..denial
        }
    );
    assert_eq!(records[2].event.decision, Outcome::Allow);
    assert!(verify(&dir).is_ok());
    running.stop().await;
}

#[tokio::test]
async fn counts_still_being_made_are_recorded_when_the_agent_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let running = Running::start(&dir, &config());
    let denial = AuditEvent {
        pid: Some(7),
        reason: Some("no".into()),
        ..AuditEvent::new(EventKind::Validate, Outcome::Deny)
    };
    for _ in 0..5 {
        running.log.record(denial.clone()).unwrap();
    }
    running.log.record_counts();
    running.flush().await;
    let records = read(&dir, &ReadFilter::default()).unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1].event.repeated, Some(4));
    // Nothing is counted twice.
    running.log.record_counts();
    running.flush().await;
    assert_eq!(read(&dir, &ReadFilter::default()).unwrap().len(), 2);
    running.stop().await;
}

/// A record is in its file before `record` returns: written on the
/// caller's thread, with no writer loop running at all. Only the sync and
/// `HEAD` wait for the loop.
#[tokio::test]
async fn a_record_is_in_the_file_when_record_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, writer) = AuditLog::open(tmp.path(), &config(), key()).unwrap();
    for i in 0..3 {
        log.record(event(i)).unwrap();
        assert_eq!(lines_of(&segment(tmp.path(), 1)).len(), i + 1);
    }
    guarded(log.written()).await.unwrap();
    // Written, not yet synced: HEAD still names the empty chain.
    let report = verify(tmp.path()).unwrap();
    assert_eq!((report.head_seq, report.last_seq), (0, 3));

    let cancel = CancellationToken::new();
    let job = tokio::spawn(writer.run(cancel.clone()));
    guarded(log.flush()).await;
    assert_eq!(verify(tmp.path()).unwrap().head_seq, 3);
    cancel.cancel();
    guarded(job).await.unwrap();
}

/// Many threads record at once into small files while the writer syncs
/// every millisecond: every record is there once, in one chain, and no
/// file passes `max_file_bytes` (a new file waits for a sync in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_keep_one_chain_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        flush_interval: Duration::from_millis(1),
        ..small_files()
    };
    let running = Running::start(tmp.path(), &config);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = running.log.clone();
            std::thread::spawn(move || {
                for i in 0..150 {
                    log.record(event(t * 1000 + i)).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    running.flush().await;
    running.stop().await;

    let report = verify(tmp.path()).unwrap();
    assert_eq!((report.records, report.head_seq), (600, 600));
    assert!(report.files > 10, "{} files", report.files);
    for (number, path) in files::list_segments(tmp.path()).unwrap() {
        let len = fs::metadata(&path).unwrap().len();
        assert!(len <= 4096, "{number}: {len} bytes");
    }
    let mut reasons: Vec<String> = read(tmp.path(), &ReadFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.event.reason.unwrap())
        .collect();
    reasons.sort();
    reasons.dedup();
    assert_eq!(reasons.len(), 600);
}

mod failures;
