//! Regressions of the writer's failure paths since records are written on
//! the caller's thread (issue 20's review): a failed write or sync, and
//! what callers may do before the writer loop has seen it.
//!
//! A sync that fails is a real failed `fsync(2)`: `/dev/null` takes
//! writes and refuses a sync (`EINVAL`), so a segment's file swapped for
//! it fails where a dying disk would, with everything else real.

use std::sync::Arc;

use super::*;

/// `/dev/null` opened for writing: writes vanish, a sync fails.
fn sink() -> Arc<fs::File> {
    Arc::new(
        fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null"),
    )
}

fn reasons(dir: &Path) -> Vec<String> {
    read(dir, &ReadFilter::default())
        .expect("read the trail")
        .into_iter()
        .map(|r| r.event.reason.expect("every test event has a reason"))
        .collect()
}

/// Regression: a write that failed on a trail with nothing left to sync
/// (the writer loop asleep until woken) woke no one, so nothing ever
/// wrote the kept record again: the log stayed failed, refusing every
/// record, long after the disk was back.
#[tokio::test]
async fn a_failed_write_on_a_synced_trail_is_retried_without_a_flush() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let running = Running::start(dir, &small_files());
    let blocker = segment(dir, 2);
    fs::create_dir(&blocker).expect("block the second file");

    // One record at a time, each synced, until one needs the second file:
    // that write fails with the writer idle.
    let mut next = 0;
    loop {
        match running.log.record(event(next)) {
            Ok(()) => running.flush().await,
            Err(AuditUnavailable::Failed { .. }) => break,
            Err(other) => panic!("expected a failed write, got {other:?}"),
        }
        next += 1;
        assert!(next < 100, "the second file was never needed");
    }
    assert!(running.log.problem().is_some());

    // The disk is back: the writer retries by itself (no flush, no other
    // record to wake it), writes the kept record and recovers.
    fs::remove_dir(&blocker).expect("unblock");
    eventually("the writer to recover by itself", || {
        running.log.problem().is_none()
    })
    .await;
    running.stop().await;
    assert_eq!(
        reasons(dir),
        (0..=next)
            .map(|i| format!("reason {i}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(verify(dir).expect("verify").head_seq, next as u64 + 1);
}

/// Regression: a sync that failed cut the records it may have lost and
/// queued them to be written again, but the log was marked failed only
/// later, by the writer loop. A caller in between was not refused: its
/// record went where the cut records belong (before them in the file, so
/// the chain broke once they were written again), and `written` vouched
/// for a record that was no longer in the file.
#[tokio::test]
async fn a_failed_sync_refuses_callers_before_the_writer_loop_sees_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (log, writer) = AuditLog::open(dir, &config(), key()).expect("open");
    log.record(event(0)).expect("record 0");
    log.record(event(1)).expect("record 1");

    // The writer loop's sync, as `sync_and_move_head` runs it, failing.
    let trail = writer.trail();
    let mut job = trail.lock().begin_sync().expect("records to sync");
    job.file = sink();
    let result = job.file.sync_data();
    assert!(result.is_err(), "a sync of /dev/null fails");
    assert!(trail.lock().end_sync(&job, result).is_err());

    // Before the loop has reported anything.
    assert!(
        guarded(log.written()).await.is_err(),
        "written vouches for records the failed sync cut"
    );
    match log.record(event(2)) {
        Err(AuditUnavailable::Failed { .. }) => {}
        other => panic!("expected a refusal while records wait to be written again, got {other:?}"),
    }

    // The writer writes the cut records again, in order, and recovers.
    let cancel = CancellationToken::new();
    let job = tokio::spawn(writer.run(cancel.clone()));
    eventually("the writer to recover", || log.problem().is_none()).await;
    log.record(event(3)).expect("record 3");
    guarded(log.flush()).await;
    cancel.cancel();
    guarded(job).await.expect("writer");
    assert_eq!(reasons(dir), ["reason 0", "reason 1", "reason 3"]);
    assert_eq!(verify(dir).expect("verify").head_seq, 3);
}

/// Regression: when the writer loop wrote records again after a failure
/// and one of them needed a new file, a failed sync of the full file put
/// the record it was writing back *before* the ones the sync cut, so the
/// next attempt wrote them out of order (a broken chain in the file).
#[tokio::test]
async fn records_written_again_keep_their_order_when_a_new_file_cannot_be_started() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (log, writer) = AuditLog::open(dir, &small_files(), key()).expect("open");
    let trail = writer.trail();
    log.record(event(0)).expect("record 0");
    // From now on the file takes writes and fails every sync.
    trail.lock().segment.as_mut().expect("the first file").file = sink();

    // Records fill the file; the one that needs a new file syncs the full
    // one, which fails: that record and the ones the sync cut wait to be
    // written again.
    let mut next = 1;
    loop {
        match log.record(event(next)) {
            Ok(()) => next += 1,
            Err(AuditUnavailable::Failed { .. }) => break,
            Err(other) => panic!("expected a failed sync, got {other:?}"),
        }
        assert!(next < 100, "the second file was never needed");
    }
    let seqs = |disk: &disk::Disk| disk.pending.iter().map(|l| l.seq).collect::<Vec<_>>();
    let all: Vec<u64> = (1..=next as u64 + 1).collect();
    assert_eq!(seqs(&trail.lock()), all);

    // The writer loop's next attempt (`/dev/null` cannot be cut back, and
    // need not be) meets the failing sync again.
    let mut disk = trail.lock();
    disk.segment.as_mut().expect("the file").needs_truncate = false;
    assert!(disk.rewrite().is_err());
    assert_eq!(seqs(&disk), all, "the records to write again, in order");
}

/// Regression: with `stdout = true`, the records a caller's new file
/// synced waited in memory for the writer loop to print them, beyond
/// `queue`: a writer stuck printing (a stdout nobody reads) let callers
/// go on recording, every synced record kept in memory, without bound.
#[tokio::test]
async fn records_waiting_to_be_printed_count_against_the_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = AuditConfig {
        stdout: true,
        queue: 8,
        ..small_files()
    };
    // No writer loop runs: as if it were stuck printing.
    let (log, _writer) = AuditLog::open(tmp.path(), &config, key()).expect("open");
    let mut recorded = 0;
    let refusal = loop {
        match log.record(event(recorded)) {
            Ok(()) => recorded += 1,
            Err(refusal) => break refusal,
        }
        assert!(
            recorded < 100,
            "100 records taken with the writer stuck and a queue of 8"
        );
    };
    assert!(
        matches!(refusal, AuditUnavailable::QueueFull { capacity: 8 }),
        "{refusal:?}"
    );
    assert_eq!(recorded, 8);
    assert!(log.problem().is_some_and(|p| p.contains("queue is full")));
}

/// Tells [`child_printing_to_a_stdout_nobody_reads`] its audit directory.
const STDOUT_CHILD_DIR: &str = "TETHER_AUDIT_STDOUT_CHILD_DIR";
const STDOUT_CHILD: &str = "audit::tests::failures::child_printing_to_a_stdout_nobody_reads";
/// The child's verdict, written once its runtime ran on while printing
/// was blocked.
const ALIVE: &str = "alive";

/// Regression: the writer loop printed synced records (`stdout = true`) on
/// its runtime thread, no longer on the blocking pool: a stdout nobody
/// reads blocked that thread, and every job the runtime would run on it.
/// A child process records into a stdout pipe this test never reads.
#[test]
fn a_stdout_nobody_reads_blocks_no_runtime_thread() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", STDOUT_CHILD, "--nocapture", "--ignored"])
        .env(STDOUT_CHILD_DIR, tmp.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    // Held, never read: the pipe fills and the child's prints block.
    let _stdout = child.stdout.take();
    let marker = tmp.path().join(ALIVE);
    let deadline = std::time::Instant::now() + GUARD;
    while !marker.exists() && std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the child ended early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        marker.exists(),
        "the child's runtime stopped while the audit writer printed to a full stdout"
    );
}

#[test]
#[ignore = "child process of audit::tests::failures::a_stdout_nobody_reads_blocks_no_runtime_thread"]
fn child_printing_to_a_stdout_nobody_reads() {
    let dir = PathBuf::from(
        std::env::var_os(STDOUT_CHILD_DIR)
            .expect("run by a_stdout_nobody_reads_blocks_no_runtime_thread"),
    );
    let audit = dir.join("audit");
    // One runtime thread: a job blocked on it blocks the runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = AuditConfig {
            stdout: true,
            ..config()
        };
        let running = Running::start(&audit, &config);
        // Well past a pipe's 64 KiB: the printing blocks.
        for i in 0..400 {
            running.log.record(event(i)).expect("record");
        }
        eventually("HEAD to name every record", || {
            verify(&audit).is_ok_and(|report| report.head_seq == 400)
        })
        .await;
        // The writer's printing is under way (it follows HEAD at once):
        // the runtime must still run this job.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fs::write(dir.join(ALIVE), "").expect("write the marker");
        // The parent kills this process: the writer never finishes.
        std::future::pending::<()>().await;
    });
}
