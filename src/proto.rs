//! Generated protobuf messages and gRPC stubs (see `build.rs` and `proto/`).
//!
//! Nothing but `include!`s lives here: proto types stop at the edges
//! (`workload_api`, `admin_api`, `cli`), whose `convert.rs` files translate.

/// The SPIFFE Workload API (`proto/spiffe/workload/workload.proto`). The file
/// has no protobuf package, so its service is `/SpiffeWorkloadAPI/...`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// tether's admin API (`proto/tether/admin/v1/admin.proto`), served on the
/// admin socket only.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/tether.admin.v1.rs"));
}

/// tether's Task API (`proto/tether/task/v1/task.proto`), served on the
/// workload socket.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod task {
    include!(concat!(env!("OUT_DIR"), "/tether.task.v1.rs"));
}
