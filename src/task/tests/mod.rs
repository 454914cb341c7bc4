//! Unit tests of the task module, by concern. Each builds a real agent
//! (authority, store and audit trail in a temporary directory:
//! [`harness::Agent`]) and drives it through the module's own API; nothing
//! is mocked, every token is signed and verified.

mod exchange;
mod fleet;
mod foreign;
mod harness;
mod restore;
mod validate;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::attestation::ProcessKey;
use crate::store::TaskRow;

/// A stored task row for unit tests: owned by `owner`, ten minutes to live.
pub(crate) fn test_row(id: &str, owner: ProcessKey, scope_descendants: bool) -> TaskRow {
    let now = SystemTime::now();
    TaskRow {
        id: id.into(),
        owner_pid: owner.pid(),
        owner_start_time: owner.start_time(),
        owner_uid: 1000,
        owner_executable: None,
        owner_exe_sha256: None,
        spiffe_id: "spiffe://example.org/agent".into(),
        entry_id: "ent-1".into(),
        audience: "spiffe://example.org/mcp".into(),
        intent: "test".into(),
        tools: vec!["search".into()],
        bind_x5t: None,
        created_at: now,
        deadline: now + Duration::from_secs(600),
        ended: None,
        tokens_issued: 0,
        scope_descendants,
    }
}

/// `t` in whole seconds since the epoch, as token claims count.
fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}
