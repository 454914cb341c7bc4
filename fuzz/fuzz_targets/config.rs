//! The agent's configuration file (TOML), through the same loader as
//! `tether run --config`: parse, defaults, validation of every key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::config::{Config, MapEnv};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text, &MapEnv::default());
    }
});
