//! `/proc/<pid>/status` and `/proc/<pid>/stat` as attestation reads them.
//! The process names itself (`comm`, up to 15 bytes of anything,
//! parentheses and newlines included) inside both files.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use tether::attestation::procfs;

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let _ = procfs::parse_status(data);
    let _ = procfs::parse_stat_start_time(data);
    let _ = procfs::parse_stat_parent(data);
}
