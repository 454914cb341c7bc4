//! Policy files (Cedar), loaded as the agent loads `policy_dir`: parsed,
//! validated against tether's schema, annotations read.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use std::time::Duration;

use tether::policy::{Policy, PolicyConfig};

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("fuzz.cedar"), text).expect("a policy file");
    let config = PolicyConfig {
        dir: Some(dir.path().to_owned()),
        poll_interval: Duration::from_secs(2),
    };
    let _ = Policy::load(&config);
}
