//! Other nodes' tasks, in fleet mode: what this agent knows about tasks it
//! does not own. The fleet link feeds it from the server's sync stream
//! (ended tasks, heartbeats); [`super::Tasks`] consults it for every token
//! of a task that is not local.
//!
//! A token of another node's task is accepted only when its task is not
//! known ended AND this agent is fresh: caught up on the current stream
//! (its first heartbeat arrived, so every end before it was applied) and
//! had a heartbeat within `server.revocation_staleness`: only a heartbeat
//! says the server is current with the fleet's ends, so no other message
//! (a snapshot, a page of ends) keeps this agent fresh. Anything
//! else is refused (fail closed): an end could have been missed.
//!
//! Invariants:
//! - an end, once applied, is kept until its task's deadline plus
//!   [`SKEW_MARGIN`] (every token of the task has expired by then, even on
//!   a node whose clock runs a minute behind), and never made live again;
//!   the first end of a task stands;
//! - the set is bounded (`max_ends`); an end that finds no room is not
//!   kept, and then every other node's task is refused until that end's
//!   own keep-until has passed (its tokens have all expired) and there is
//!   room again;
//! - freshness runs on the monotonic clock ([`Instant`]); only the ends'
//!   deadlines, which come from other nodes, are wall-clock times.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::TokenRejection;

/// How long past its deadline an end is kept: other nodes' clocks may run
/// behind this one's by up to this much.
pub const SKEW_MARGIN: Duration = Duration::from_secs(60);
/// Longest end reason kept (it is shown to whoever presents a token).
const MAX_REASON_LEN: usize = 200;
/// Longest task id shown in a refusal.
const MAX_TXN_SHOWN: usize = 80;

/// An ended task of another node, as the server's sync stream sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignEnd {
    /// The task (`txn`).
    pub txn: String,
    /// Why it ended, in words.
    pub reason: String,
    /// The task's deadline: every token of it expires by then.
    pub deadline: SystemTime,
    /// The server's revision of this end; revisions only grow.
    pub revision: u64,
}

/// What this agent knows about other nodes' tasks. Cheap to clone: every
/// clone is the same set.
#[derive(Debug, Clone)]
pub struct ForeignTasks {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    staleness: Duration,
    max_ends: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Ended tasks by id.
    ends: HashMap<String, Kept>,
    /// The same ends by when they may be forgotten, soonest first.
    expiry: BTreeSet<(SystemTime, String)>,
    /// The revision of the last end applied (or the last heartbeat's).
    watermark: u64,
    /// The current stream's first heartbeat arrived.
    caught_up: bool,
    /// Some stream has ever caught up.
    ever_caught_up: bool,
    /// When the server last vouched for this agent's ends (its last
    /// heartbeat). Only a heartbeat counts: a replica that cannot read the
    /// store still sends snapshots, but no heartbeat.
    last_heard: Option<Instant>,
    /// An end found no room: until then (its keep-until), other nodes'
    /// tasks are refused.
    overflow_until: Option<SystemTime>,
    /// The overflow was logged (once per episode).
    overflow_logged: bool,
}

/// An end as kept (when it may be forgotten is in `State::expiry`).
#[derive(Debug, Clone)]
struct Kept {
    reason: String,
}

// === impl ForeignTasks ===

impl ForeignTasks {
    /// An empty set, not caught up. `staleness`: how long without a word
    /// from the server other nodes' tasks are still accepted
    /// (`server.revocation_staleness`); `max_ends`: the most ends kept.
    pub fn new(staleness: Duration, max_ends: usize) -> Self {
        Self {
            inner: Arc::new(Shared {
                staleness,
                max_ends,
                state: Mutex::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A new sync stream opened: not caught up until its first heartbeat.
    pub fn stream_opened(&self) {
        self.state().caught_up = false;
    }

    /// Ended tasks arrived. Each is kept until its deadline plus
    /// [`SKEW_MARGIN`]; one already past that only moves the watermark.
    /// A task already known ended keeps its first end. Expired ends are
    /// pruned first; an end that still finds no room is not kept, and
    /// other nodes' tasks are refused until it would have been forgotten.
    pub fn apply_ends(&self, ends: impl IntoIterator<Item = ForeignEnd>) {
        let now = SystemTime::now();
        let max_ends = self.inner.max_ends;
        let mut state = self.state();
        state.prune(now);
        for end in ends {
            state.watermark = state.watermark.max(end.revision);
            let until = end
                .deadline
                .checked_add(SKEW_MARGIN)
                .unwrap_or(end.deadline);
            if until <= now || state.ends.contains_key(&end.txn) {
                continue;
            }
            if state.ends.len() >= max_ends {
                state.overflow(until, max_ends);
                continue;
            }
            state.expiry.insert((until, end.txn.clone()));
            state.ends.insert(
                end.txn,
                Kept {
                    reason: bounded(&end.reason, MAX_REASON_LEN),
                },
            );
        }
    }

    /// A heartbeat: every end up to `revision` was sent, so this agent is
    /// caught up from now (and has heard from the server). `revision` is
    /// the next stream's start even when it is below the watermark: the
    /// server's index was reset and numbers its ends again from below, so
    /// an end at a revision this agent has passed may still be new to it.
    pub fn heartbeat(&self, revision: u64) {
        let mut state = self.state();
        state.watermark = revision;
        state.caught_up = true;
        state.ever_caught_up = true;
        state.last_heard = Some(Instant::now());
    }

    /// The stream failed or ended: not caught up.
    pub fn stream_lost(&self) {
        self.state().caught_up = false;
    }

    /// The revision of the last end applied (or heartbeat received): what
    /// the next stream asks for the ends after. 0 at start.
    pub fn watermark(&self) -> u64 {
        self.state().watermark
    }

    /// Why `txn` ended, when the fleet says it did (whatever the
    /// staleness): an operator's `tether server task revoke` of a task of
    /// this node reaches it this way.
    pub fn ended(&self, txn: &str) -> Option<String> {
        self.state().ends.get(txn).map(|kept| kept.reason.clone())
    }

    /// Ok when a token of another node's task `txn` may be accepted: the
    /// task is not known ended, and this agent is fresh (caught up on the
    /// current stream and heard from the server within the staleness
    /// bound). An ended task is refused as [`TokenRejection::Ended`],
    /// anything else as [`TokenRejection::Stale`].
    pub fn check(&self, txn: &str) -> Result<(), TokenRejection> {
        let mut state = self.state();
        if let Some(kept) = state.ends.get(txn) {
            return Err(TokenRejection::Ended {
                txn: bounded(txn, MAX_TXN_SHOWN),
                reason: kept.reason.clone(),
            });
        }
        match self.problem_of(&mut state, SystemTime::now()) {
            Some(detail) => Err(TokenRejection::Stale {
                txn: bounded(txn, MAX_TXN_SHOWN),
                detail,
            }),
            None => Ok(()),
        }
    }

    /// Time since the server was last heard from (`None`: never).
    pub fn last_heard_age(&self) -> Option<Duration> {
        self.state().last_heard.map(|at| at.elapsed())
    }

    /// Why other nodes' tasks are refused right now (`None`: they are not).
    pub fn problem(&self) -> Option<String> {
        let mut state = self.state();
        self.problem_of(&mut state, SystemTime::now())
    }

    /// Forgets the ends whose tasks' tokens have all expired.
    pub fn prune(&self) {
        self.state().prune(SystemTime::now());
    }

    /// How many ends are kept.
    pub fn len(&self) -> usize {
        self.state().ends.len()
    }

    /// True when no end is kept.
    pub fn is_empty(&self) -> bool {
        self.state().ends.is_empty()
    }

    /// Why other nodes' tasks are refused, worded to follow "task X is
    /// another node's, and ".
    fn problem_of(&self, state: &mut State, now: SystemTime) -> Option<String> {
        state.end_overflow_if_over(now);
        if state.overflow_until.is_some() {
            return Some(format!(
                "this agent's set of other nodes' ended tasks is full ({} kept): an end could not be kept, so their tokens are refused until it would have expired",
                self.inner.max_ends
            ));
        }
        if !state.caught_up {
            let since = if state.ever_caught_up {
                "it reconnected"
            } else {
                "it started"
            };
            return Some(format!(
                "this agent has not caught up with the tether server's task ends since {since}: its end could have been missed"
            ));
        }
        let age = state.last_heard.map(|at| at.elapsed());
        match age {
            Some(age) if age <= self.inner.staleness => None,
            Some(age) => Some(format!(
                "this agent has not heard from the tether server for {} (server.revocation_staleness is {}): its end could have been missed",
                humantime::format_duration(round(age)),
                humantime::format_duration(self.inner.staleness),
            )),
            None => Some(
                "this agent has never heard from the tether server: its end could have been missed"
                    .to_owned(),
            ),
        }
    }
}

// === impl State ===

impl State {
    /// Forgets every end kept until `now` or before.
    fn prune(&mut self, now: SystemTime) {
        while let Some((until, _)) = self.expiry.first()
            && *until <= now
        {
            if let Some((_, txn)) = self.expiry.pop_first() {
                self.ends.remove(&txn);
            }
        }
        self.end_overflow_if_over(now);
    }

    /// An end found no room: refuse other nodes' tasks until `until`, and
    /// say so once.
    fn overflow(&mut self, until: SystemTime, max_ends: usize) {
        self.overflow_until = Some(self.overflow_until.map_or(until, |u| u.max(until)));
        if !self.overflow_logged {
            self.overflow_logged = true;
            tracing::error!(
                max_ends,
                "the set of other nodes' ended tasks is full; refusing every other node's task token until room frees"
            );
        }
    }

    /// Ends an overflow whose lost ends have all expired, if there is room.
    fn end_overflow_if_over(&mut self, now: SystemTime) {
        if self.overflow_until.is_some_and(|until| until <= now) {
            self.overflow_until = None;
            self.overflow_logged = false;
            tracing::info!(
                "other nodes' task tokens are accepted again: the ends that found no room have expired"
            );
        }
    }
}

/// At most `max` characters of `text`.
fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// `d` to whole seconds, or whole milliseconds under a second.
fn round(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
