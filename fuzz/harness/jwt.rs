//! Tokens presented to ValidateJWTSVID, ValidateTaskToken and
//! ExchangeToken: every one goes through `svid::jwt::validate` against the
//! agent's real bundle (a P-256 key made once per run). Nothing an input
//! can say may make it valid without the agent's signature.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use std::sync::{Arc, OnceLock};

use spiffe::TrustDomain;
use tether::authority::{Authority as _, AuthorityConfig, LocalAuthority};
use tether::bundle::TrustBundle;

struct Fixture {
    _dir: tempfile::TempDir,
    bundle: Arc<TrustBundle>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let td = TrustDomain::new("example.org").expect("a trust domain");
        let authority = LocalAuthority::load_or_create(td, AuthorityConfig::default(), dir.path())
            .expect("an authority");
        Fixture {
            bundle: authority.bundle(),
            _dir: dir,
        }
    })
}

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let fixture = fixture();
    let verdict = tether::svid::jwt::validate(token, "api", |_| Some(Arc::clone(&fixture.bundle)));
    assert!(
        verdict.is_err(),
        "a token the agent never signed was accepted: {token}"
    );
}
