//! Selectors and SPIFFE ID templates as entries and the admin API carry
//! them (`unix:uid:1000`, `k8s:pod-label:app:web`, `{{ .PodName }}`).
#![no_main]

use std::str::FromStr as _;

use libfuzzer_sys::fuzz_target;
use spiffe::TrustDomain;
use tether::registration::Selector;

fuzz_target!(|data: &[u8]| {
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
});
