//! `cargo fuzz run bundle`: the harness in `fuzz/harness/bundle.rs` under libFuzzer.
#![no_main]

#[path = "../harness/bundle.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
