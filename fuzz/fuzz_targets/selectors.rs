//! `cargo fuzz run selectors`: the harness in `fuzz/harness/selectors.rs` under libFuzzer.
#![no_main]

#[path = "../harness/selectors.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
