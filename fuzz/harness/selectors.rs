//! Selectors and SPIFFE ID templates as entries and the admin API carry
//! them (`unix:uid:1000`, `k8s:pod-label:app:web`, `{{ .PodName }}`).
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use std::str::FromStr as _;

use spiffe::TrustDomain;
use tether::registration::Selector;

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = Selector::from_str(text) {
        // Display and parse agree.
        let again = Selector::from_str(&selector.to_string()).expect("a displayed selector parses");
        assert_eq!(again, selector);
    }
    let td = TrustDomain::new("example.org").expect("a trust domain");
    let _ = tether::registration::entry::parse_workload_id(text, &td);
}
