//! `cargo fuzz run jwt`: the harness in `fuzz/harness/jwt.rs` under libFuzzer.
#![no_main]

#[path = "../harness/jwt.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
