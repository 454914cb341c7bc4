//! An audit segment as `tether audit verify` reads it: lines, hashes, the
//! chain between them, a torn tail, and a `HEAD` with its seal. A trail
//! can be tampered with; the verifier must say so, never crash.
//!
//! One input through the parser: first as a segment alone, then with its
//! last line also as `HEAD`, checked against a published key. Shared by
//! the fuzz target and by the seed replay of the test suite
//! (`tests/integration/fuzz_seeds.rs`).

use std::sync::LazyLock;

/// One key for every input: generating one per run would be most of it.
static KEY: LazyLock<tether::audit::PublicKey> = LazyLock::new(|| {
    let (key, _) = tether::audit::SigningKey::generate().expect("an audit key");
    key.public_key().clone()
});

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("audit-000001.jsonl"), data).expect("a segment");
    let _ = tether::audit::verify(dir.path(), &[]);
    let _ = tether::audit::read(dir.path(), &tether::audit::ReadFilter::default());

    let last = data
        .strip_suffix(b"\n")
        .unwrap_or(data)
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    let mut head = last.to_vec();
    head.push(b'\n');
    std::fs::write(dir.path().join("HEAD"), head).expect("a HEAD");
    let _ = tether::audit::verify(dir.path(), std::slice::from_ref(&*KEY));
}
