//! `cargo fuzz run policy`: the harness in `fuzz/harness/policy.rs` under libFuzzer.
#![no_main]

#[path = "../harness/policy.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
