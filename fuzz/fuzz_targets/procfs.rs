//! `cargo fuzz run procfs`: the harness in `fuzz/harness/procfs.rs` under libFuzzer.
#![no_main]

#[path = "../harness/procfs.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
