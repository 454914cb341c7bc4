//! `tether server`: the fleet's authority and registry (issue 17, being
//! built; the plan is `docs/fleet-design.md`).
//!
//! Landed so far: [`scope`], the rule deciding which identities a node may
//! obtain. It is pure, so it is tested on its own, ahead of the server
//! that will ask it on every signing request.

pub mod scope;
