//! The agent's configuration file (TOML), through the same loader as
//! `tether run --config`: parse, defaults, validation of every key.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use tether::config::{Config, MapEnv};

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text, &MapEnv::default());
    }
}
