//! `/proc/<pid>/cgroup` as the Kubernetes attestor reads it. A process
//! can shape its cgroup path (a systemd unit name, a nested runtime).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tether::attestation::k8s::pod_container(text);
    }
});
