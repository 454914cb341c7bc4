//! `tether server`: the fleet's authority and registry (issue 17, being
//! built; the plan is `docs/fleet-design.md`).
//!
//! Landed so far, each tested on its own ahead of the server that will
//! use it: [`scope`], the rule deciding which identities a node may
//! obtain; [`config`], the server's configuration file (the fleet's
//! contract keys); [`join_token`], the single-use tokens that admit a
//! node, kept only as their hash; [`store`], the fleet's shared state
//! behind one trait, with its SQLite backend; [`registry`], the entries
//! the server serves (the file's and the stored ones, validated as the
//! agent validates its own, polled for other replicas' changes);
//! [`admin`], the operators' socket (join tokens, entries, nodes, the
//! bundle).

pub mod admin;
pub mod config;
pub mod join_token;
pub mod registry;
pub mod scope;
pub mod store;
