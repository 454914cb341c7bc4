//! Waiting for what happens in its own time (an agent that starts, a loop
//! that notices, a slot given back): [`eventually`] polls a check until it
//! holds, [`eventually_blocking`] the same without a runtime.
//!
//! The deadline ([`PATIENCE`]) is a hang guard, never a timing check: a
//! test that needs it fails, naming what it awaited and, when the check
//! said why it did not hold yet, its last answer.

use std::fmt::{Debug, Display};
use std::time::Duration;

use super::PATIENCE;

/// How long to wait between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a check answers: `true`, `Some(value)` or `Ok(value)` when what is
/// awaited has happened; otherwise not yet (an `Err` says why, for the
/// failure message).
pub trait Awaited {
    /// What the check found.
    type Value;

    /// The value found, or the reason (possibly empty) it is not there yet.
    fn into_found(self) -> Result<Self::Value, String>;
}

impl Awaited for bool {
    type Value = ();

    fn into_found(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Awaited for Option<T> {
    type Value = T;

    fn into_found(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T, E: Debug> Awaited for Result<T, E> {
    type Value = T;

    fn into_found(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// Runs `check` until it holds and returns what it found; fails, naming
/// `what`, once [`PATIENCE`] has passed.
pub async fn eventually<A: Awaited>(what: impl Display, check: impl AsyncFnMut() -> A) -> A::Value {
    eventually_within(PATIENCE, what, check).await
}

/// [`eventually`] with a longer hang guard, for what happens at a slow
/// pace of its own (a federated bundle's fetch, 30 s apart at least).
pub async fn eventually_within<A: Awaited>(
    patience: Duration,
    what: impl Display,
    mut check: impl AsyncFnMut() -> A,
) -> A::Value {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let last = match check().await.into_found() {
            Ok(found) => return found,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            give_up(patience, &what, &last);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for code without a runtime: the thread sleeps between
/// checks.
pub fn eventually_blocking<A: Awaited>(
    what: impl Display,
    mut check: impl FnMut() -> A,
) -> A::Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let last = match check().into_found() {
            Ok(found) => return found,
            Err(last) => last,
        };
        if std::time::Instant::now() >= deadline {
            give_up(PATIENCE, &what, &last);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Fails the test, naming how long it waited (`patience`, the one it was
/// given) and for what.
fn give_up(patience: Duration, what: &impl Display, last: &str) -> ! {
    if last.is_empty() {
        panic!("gave up after {patience:?} waiting for {what}");
    }
    panic!("gave up after {patience:?} waiting for {what}; last: {last}");
}
