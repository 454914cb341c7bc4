//! `tether server`: the fleet's authority and registry (issue 17, being
//! built; the plan is `docs/fleet-design.md`).
//!
//! Landed so far: [`scope`], the rule deciding which identities a node may
//! obtain, and [`config`], the server's configuration file (the fleet's
//! contract keys). Both are tested on their own, ahead of the server that
//! will use them.

pub mod config;
pub mod scope;
