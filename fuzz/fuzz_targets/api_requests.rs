//! `cargo fuzz run api_requests`: the harness in `fuzz/harness/api_requests.rs` under libFuzzer.
#![no_main]

#[path = "../harness/api_requests.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
