//! Where configuration reads the process environment: an injected
//! [`EnvSource`], so tests never touch the real environment.
//!
//! Overrides (each wins over the file):
//! `TETHER_TRUST_DOMAIN`, `TETHER_SOCKET_PATH`, `TETHER_DATA_DIR`,
//! `TETHER_LOG_LEVEL`, `TETHER_LOG_FORMAT`. Default paths also look at
//! `XDG_RUNTIME_DIR`, `XDG_DATA_HOME` and `HOME`.

use std::collections::HashMap;
use std::fmt;

/// Read access to environment variables and the effective uid.
pub trait EnvSource: fmt::Debug {
    /// The variable's value, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// The effective uid of the process (root gets system-wide paths).
    fn euid(&self) -> u32;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

/// A fixed environment, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv {
    /// The variables.
    pub vars: HashMap<String, String>,
    /// The uid to report.
    pub euid: u32,
}

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn euid(&self) -> u32 {
        nix::unistd::geteuid().as_raw()
    }
}

impl EnvSource for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn euid(&self) -> u32 {
        self.euid
    }
}
