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

/// The fleet's APIs (`proto/tether/server/v1/`): the node API agents call
/// over mutual TLS (`Node`), and the server's admin API on its admin socket
/// (`ServerAdmin`). They reuse the admin API's entry and bundle messages,
/// which the generated code reaches as `super::super::admin::v1`: the
/// module tree below gives it that path.
pub use fleet_package::server::v1 as server;

mod fleet_package {
    pub mod admin {
        pub use crate::proto::admin as v1;
    }
    pub mod server {
        #[allow(
            missing_docs,
            missing_debug_implementations,
            unused_qualifications,
            clippy::all,
            clippy::pedantic,
            reason = "generated code"
        )]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tether.server.v1.rs"));
        }
    }
}
