//! An audit segment as `tether audit verify` reads it: lines, hashes, the
//! chain between them, a torn tail. A trail can be tampered with; the
//! verifier must say so, never crash.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("audit-000001.jsonl"), data).expect("a segment");
    let _ = tether::audit::verify(dir.path());
    let _ = tether::audit::read(dir.path(), &tether::audit::ReadFilter::default());
}
