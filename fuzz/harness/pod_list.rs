//! The kubelet's `/pods` answer, into the Kubernetes types and then into
//! selectors, for every pod and container it lists.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use tether::attestation::k8s::{parse_pods, selectors_of};

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let Ok(pods) = parse_pods(data) else {
        return;
    };
    for pod in &pods.items {
        let _ = selectors_of(pod, None);
        let statuses = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten());
        for status in statuses {
            let _ = selectors_of(pod, status.container_id.as_deref());
        }
    }
}
