//! `/proc/<pid>/status` and `/proc/<pid>/stat` as attestation reads them.
//! The process names itself (`comm`, up to 15 bytes of anything,
//! parentheses and newlines included) inside both files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::attestation::procfs;

fuzz_target!(|data: &[u8]| {
    let _ = procfs::parse_status(data);
    let _ = procfs::parse_stat_start_time(data);
    let _ = procfs::parse_stat_parent(data);
});
