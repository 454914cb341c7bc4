//! The gRPC-edge kit: what the Workload API, the Task API and the admin
//! API share once a connection is accepted. [`identify()`] attests the
//! caller of a request, [`gate`] puts every decision on the workload socket
//! through policy and the audit trail, [`header`] checks the Workload API's
//! security header, [`json`] turns validated claims into a protobuf
//! `Struct`, and [`status`] is the one mapping of domain errors to
//! `tonic::Status`.
//!
//! Invariant: a `tonic::Status` is constructed only in [`status`], so a
//! domain error gets the same code in every API. The sockets themselves
//! (binding, accept, peer credentials, budgets) are `crate::transport`'s,
//! which knows nothing of gRPC status.

pub mod gate;
pub mod header;
pub mod identify;
pub mod json;
pub mod status;

pub use identify::identify;
