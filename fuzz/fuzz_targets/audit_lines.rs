//! `cargo fuzz run audit_lines`: the harness in `fuzz/harness/audit_lines.rs` under libFuzzer.
#![no_main]

#[path = "../harness/audit_lines.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
