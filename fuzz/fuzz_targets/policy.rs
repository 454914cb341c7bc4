//! Policy files (Cedar), loaded as the agent loads `policy_dir`: parsed,
//! validated against tether's schema, annotations read.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tether::policy::{Policy, PolicyConfig};

fuzz_target!(|data: &[u8]| {
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
});
