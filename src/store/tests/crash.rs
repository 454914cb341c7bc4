//! Crash safety: a child process writes until it is killed with SIGKILL,
//! over several rounds on one database, and every acknowledged write must
//! be there after each restart.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;

/// Tells [`child_crash_writer`] where the store is.
const CRASH_DIR_VAR: &str = "TETHER_STORE_CRASH_DIR";

/// Prefix for the child's entry ids, distinct per round.
const CRASH_ROUND_VAR: &str = "TETHER_STORE_CRASH_ROUND";

const CRASH_CHILD: &str = "store::tests::crash::child_crash_writer";

/// The child stops by itself after this many writes if nobody kills it.
const CRASH_CHILD_MAX_WRITES: u64 = 20_000;

/// Acknowledged writes survive the writer being killed at an arbitrary
/// point, over several kill/restart rounds on the same database (each
/// round also recovers the WAL the previous victim left): entries (with
/// their process binding), records, revocations (first record kept),
/// task batches and task ends. A batch cut by the kill is there
/// whole or not at all. SIGKILL keeps
/// the page cache, so this proves commit-before-acknowledge and recovery,
/// not power-loss durability, which rests on `synchronous = FULL`
/// (checked in `migrates_from_empty_and_reopens_idempotently`).
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    for (round, kill_after) in [(0, 150), (1, 250), (2, 350)] {
        acknowledged.extend(run_writer_until_killed(dir.path(), round, kill_after));

        let store = Store::open(dir.path()).unwrap();
        // Every row decodes, and every acknowledged write is there.
        let stored: HashMap<String, EntryRow> = store
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let records: Vec<String> = store
            .live_x509(UNIX_EPOCH)
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        let revocations: HashMap<String, RevokedX509> = store
            .revoked_x509(UNIX_EPOCH)
            .unwrap()
            .into_iter()
            .map(|r| (r.serial.clone(), r))
            .collect();
        for id in &acknowledged {
            assert!(
                stored.contains_key(id),
                "round {round}: acknowledged entry {id} lost"
            );
            assert!(
                records.contains(id),
                "round {round}: acknowledged record {id} lost"
            );
            assert!(
                revocations.contains_key(id),
                "round {round}: acknowledged revocation {id} lost"
            );
        }
        // Every entry has the flag its write set, and every revocation,
        // acknowledged or cut short by the kill, is its first record:
        // never the second one the writer tried.
        for (id, row) in &stored {
            let i = crash_i(id);
            assert_eq!(row.process_bound, i % 2 == 1, "round {round}: {id}");
        }
        for (serial, record) in &revocations {
            assert_eq!(
                *record,
                crash_revocation(serial),
                "round {round}: revocation {serial}"
            );
        }

        let tasks: HashMap<String, TaskRow> = store
            .tasks_until(UNIX_EPOCH)
            .unwrap()
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let state = |id: &str| -> Option<Option<TaskEnd>> {
            let task = tasks.get(id)?;
            let tokens = if task.ended.is_some() { crash_i(id) } else { 0 };
            assert_eq!(task.tokens_issued, tokens, "round {round}: task {id}");
            Some(task.ended.clone())
        };
        // Every task, acknowledged or cut short by the kill, is in a
        // state some prefix of its writes produced: both tasks of a batch
        // or neither, both ends of a batch or neither.
        let bases: BTreeSet<&str> = tasks
            .keys()
            .map(|id| id.rsplit_once('-').unwrap().0)
            .collect();
        for base in &bases {
            let (a, b) = (format!("{base}-a"), format!("{base}-b"));
            let (Some(a_end), Some(b_end)) = (state(&a), state(&b)) else {
                panic!("round {round}: a batch of tasks was stored in part: {base}");
            };
            let states = crash_task_states(crash_i(base));
            assert!(
                states.contains(&(a_end.clone(), b_end.clone())),
                "round {round}: {base} ended as {a_end:?} and {b_end:?}, no prefix of {states:?}"
            );
        }
        // And an acknowledged task has all its writes.
        for id in &acknowledged {
            let final_state = crash_task_states(crash_i(id)).pop().unwrap();
            let a = state(&format!("{id}-a"));
            let b = state(&format!("{id}-b"));
            assert_eq!(
                (a, b),
                (Some(final_state.0), Some(final_state.1)),
                "round {round}: acknowledged tasks of {id} lost or not ended"
            );
        }
    }
}

/// The revocation the crash writer records first for serial `id`.
fn crash_revocation(id: &str) -> RevokedX509 {
    let i = crash_i(id);
    RevokedX509 {
        serial: id.to_owned(),
        ..revoked("", i, i + 3_600_000)
    }
}

/// The write number in a crash writer's id (`r1-00042`, `r1-00042-a`).
fn crash_i(id: &str) -> u64 {
    id.split('-').nth(1).unwrap().parse().unwrap()
}

/// The ends of the two tasks the crash writer's `i`-th write stores
/// (`-a`, `-b`), after each of its task writes in turn: as inserted,
/// after `end_task` (even `i`), after `end_tasks` (`i` a multiple of 3).
/// Mirrors [`child_crash_writer`].
fn crash_task_states(i: u64) -> Vec<(Option<TaskEnd>, Option<TaskEnd>)> {
    let mut states = vec![(None, None)];
    let (mut a, mut b) = (None, None);
    if i.is_multiple_of(2) {
        a = Some(end(i, "completed"));
        states.push((a.clone(), b.clone()));
    }
    if i.is_multiple_of(3) {
        // The first end wins: an `a` ended above keeps "completed".
        a.get_or_insert(end(i, "revoked"));
        b = Some(end(i, "owner exited"));
        states.push((a, b));
    }
    states
}

fn run_writer_until_killed(dir: &Path, round: u32, kill_after: usize) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CRASH_CHILD, "--nocapture", "--ignored"])
        .env(CRASH_DIR_VAR, dir)
        .env(CRASH_ROUND_VAR, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut acks = Vec::new();
    // Only whole lines count: a line cut by the kill was never finished.
    let mut read_ack = |acks: &mut Vec<String>| -> bool {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            return false;
        }
        if let Some(id) = line.strip_prefix("ack ").and_then(|l| l.strip_suffix('\n')) {
            acks.push(id.to_owned());
        }
        true
    };
    while acks.len() < kill_after {
        assert!(
            read_ack(&mut acks),
            "the writer exited after {} acknowledgements",
            acks.len()
        );
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    // Acknowledgements already in the pipe count too.
    while read_ack(&mut acks) {}
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status}");
    acks
}

#[test]
#[ignore = "child process of store::tests::crash::acknowledged_writes_survive_sigkill"]
fn child_crash_writer() {
    let dir = std::env::var(CRASH_DIR_VAR).expect("run by acknowledged_writes_survive_sigkill");
    let round = std::env::var(CRASH_ROUND_VAR).expect("run by acknowledged_writes_survive_sigkill");
    let store = Store::open(Path::new(&dir)).unwrap();
    let mut stdout = io::stdout().lock();
    for i in 0..CRASH_CHILD_MAX_WRITES {
        let id = format!("r{round}-{i:05}");
        let mut row = entry(&id, &format!("spiffe://example.org/{id}"), &["unix:uid:0"]);
        row.created_at = at(i);
        row.process_bound = i % 2 == 1;
        store.insert_entry(&row).unwrap();
        store
            .record_x509_issued(&IssuedX509 {
                serial: id.clone(),
                entry_id: id.clone(),
                ..issued("", i, i + 3_600_000)
            })
            .unwrap();
        let first = crash_revocation(&id);
        assert!(store.revoke_x509(&first).unwrap());
        let second = RevokedX509 {
            revoked_at: at(i + 1),
            reason: "operator".into(),
            ..first
        };
        assert!(!store.revoke_x509(&second).unwrap());
        let (a, b) = (format!("{id}-a"), format!("{id}-b"));
        store
            .insert_tasks(&[task(&a, i, i + 3_600_000), task(&b, i, i + 3_600_000)])
            .unwrap();
        if i.is_multiple_of(2) {
            assert!(store.end_task(&a, &end(i, "completed"), i).unwrap());
        }
        if i.is_multiple_of(3) {
            let ended = store
                .end_tasks(&[
                    (b.clone(), end(i, "owner exited"), i),
                    (a.clone(), end(i, "revoked"), i),
                ])
                .unwrap();
            assert_eq!(ended, if i.is_multiple_of(2) { 1 } else { 2 });
        }
        writeln!(stdout, "ack {id}").unwrap();
        stdout.flush().unwrap();
    }
}
