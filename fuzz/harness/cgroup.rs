//! `/proc/<pid>/cgroup` as the Kubernetes attestor reads it. A process
//! can shape its cgroup path (a systemd unit name, a nested runtime).
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tether::attestation::k8s::pod_container(text);
    }
}
