//! `cargo fuzz run cgroup`: the harness in `fuzz/harness/cgroup.rs` under libFuzzer.
#![no_main]

#[path = "../harness/cgroup.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
