//! The integration suite: one test binary, one module per area. Each test
//! starts what it needs (a real agent on a temporary socket and data dir,
//! the CLI, the example processes) and drives it as a user would.
//!
//! One binary rather than one per file: the suite links the agent once,
//! which keeps a cold build and its target directory a fraction of the
//! size. Tests that re-run this binary as a child process name their child
//! test by its full path (`module::child_…`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod common;

mod admin_api;
mod architecture;
mod audit_budget;
mod audit_log;
mod audit_seal;
mod cli_admin;
mod cli_api;
mod cli_task;
mod daemon;
mod faults;
mod federation_endpoints;
mod federation_go;
mod fleet_bench_stats;
mod fleet_introspection;
mod fleet_k8s;
mod fleet_node;
mod fleet_nodes;
mod fleet_replicas;
mod fleet_store;
mod fleet_store_tasks;
mod fleet_tasks;
mod fuzz_seeds;
mod go_spiffe;
mod hostile;
mod http_endpoint;
mod introspection;
mod k8s_attestor;
mod local_users;
mod mcp_example;
mod mcp_fleet;
mod oidc;
mod policy_audit;
mod policy_cli;
mod process_bound;
mod py_spiffe;
mod spire_federation;
mod task_tokens;
mod upstream_authority;
mod workload_api;
