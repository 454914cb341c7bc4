//! `tether server`: the fleet's authority and registry (issue 17; the map
//! is ARCHITECTURE.md, "The fleet", and what is still to come is in
//! `docs/fleet-design.md`).
//!
//! - [`run`]: the composition root of `tether server run`;
//! - [`node_api`]: the gRPC service fleet agents call over mutual TLS
//!   (attestation, sync, signing);
//! - [`admin`]: the operators' admin socket;
//! - [`bundle`]: the server's `Authority`: this replica's signatures,
//!   every replica's keys in the bundle (shared through the store);
//! - [`registry`]: the entries the server serves (its file's and the
//!   store's);
//! - [`scope`]: the rule deciding which identities a node may obtain;
//! - [`store`]: the fleet's shared state (join tokens, nodes, entries,
//!   the task index);
//! - [`tasks`]: this replica's view of the task index (the ends every
//!   node follows);
//! - [`introspect`]: the introspection backend (RFC 7662): tokens of the
//!   trust domain, task tokens judged by the fleet's task index;
//! - [`config`]: the server's configuration file (the fleet's contract
//!   keys);
//! - [`join_token`]: the single-use tokens that admit a node, kept only as
//!   their hash;
//! - [`k8s`]: the client of the Kubernetes API server (`k8s_psat` node
//!   attestation by TokenReview, and the pods that scope entries with
//!   `k8s:` selectors).

pub mod admin;
pub mod bundle;
pub mod config;
pub mod introspect;
pub mod join_token;
pub mod k8s;
pub mod node_api;
pub mod registry;
pub mod run;
pub mod scope;
pub mod store;
pub mod tasks;

pub use config::ServerConfig;
