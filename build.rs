//! Compiles the protobuf contracts with a pure-Rust compiler (protox), so a
//! build needs no system `protoc`.

use std::path::Path;

const PROTOS: &[&str] = &[
    "spiffe/workload/workload.proto",
    "tether/admin/v1/admin.proto",
    "tether/task/v1/task.proto",
    "tether/server/v1/node.proto",
    "tether/server/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("protos.rs")
        .compile_fds(descriptors)?;
    Ok(())
}
