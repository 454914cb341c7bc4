//! SPIFFE bundle files (JWKS with `x509-svid` and `jwt-svid` keys), as
//! federation and the upstream CA load them.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use spiffe::TrustDomain;
use tether::bundle::TrustBundle;

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let td = TrustDomain::new("example.org").expect("a trust domain");
    if let Ok(bundle) = TrustBundle::from_spiffe_json(td, data) {
        // What was accepted must survive the agent's own encodings.
        let _ = bundle.to_spiffe_json();
        let _ = bundle.jwks_json();
        let _ = bundle.x509_der();
    }
}
