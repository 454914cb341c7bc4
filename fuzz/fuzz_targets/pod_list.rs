//! `cargo fuzz run pod_list`: the harness in `fuzz/harness/pod_list.rs` under libFuzzer.
#![no_main]

#[path = "../harness/pod_list.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
