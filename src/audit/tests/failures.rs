//! Regressions of the writer's failure paths since records are written on
//! the caller's thread (issue 20's review): a failed write or sync, and
//! what callers may do before the writer loop has seen it.
//!
//! A sync that fails is a real failed `fsync(2)`: `/dev/null` takes
//! writes and refuses a sync (`EINVAL`), so a segment's file swapped for
//! it fails where a dying disk would, with everything else real.

use super::*;

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
        (0..=next).map(|i| format!("reason {i}")).collect::<Vec<_>>()
    );
    assert_eq!(verify(dir).expect("verify").head_seq, next as u64 + 1);
}

