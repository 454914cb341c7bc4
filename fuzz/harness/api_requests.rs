//! Workload API and Task API request messages, as the transport decodes
//! them (prost, the codec tonic uses), then the checks every handler runs
//! before anything else: audience lists and lengths, SPIFFE IDs.
//!
//! One input through the parser. Shared by the fuzz target and by the
//! seed replay of the test suite (`tests/integration/fuzz_seeds.rs`).

use prost::Message as _;
use tether::edge::status::bounded;
use tether::proto::{task, workload};
use tether::workload_api::WorkloadApiLimits;

/// Runs one input; a panic is a finding.
pub fn run(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let limits = WorkloadApiLimits::default();
    match which % 9 {
        0 => {
            if let Ok(req) = workload::JwtsvidRequest::decode(body) {
                let _ = limits.check_audiences(&req.audience);
                let _ = spiffe::SpiffeId::new(&req.spiffe_id);
            }
        }
        1 => {
            if let Ok(req) = workload::ValidateJwtsvidRequest::decode(body) {
                let _ = bounded(
                    "audience",
                    &req.audience,
                    limits.max_audience_len,
                    "limits.max_audience_len",
                );
            }
        }
        2 => {
            let _ = workload::X509svidRequest::decode(body);
            let _ = workload::X509BundlesRequest::decode(body);
            let _ = workload::JwtBundlesRequest::decode(body);
        }
        3 => {
            if let Ok(req) = task::BeginTaskRequest::decode(body) {
                let _ = bounded("intent", &req.intent, 1024, "tasks.max_intent_len");
                let _ = spiffe::SpiffeId::new(&req.spiffe_id);
            }
        }
        4 => {
            let _ = task::WatchTaskRequest::decode(body);
            let _ = task::RenewTaskRequest::decode(body);
        }
        5 => {
            let _ = task::EndTaskRequest::decode(body);
        }
        6 => {
            let _ = task::ExchangeTokenRequest::decode(body);
        }
        7 => {
            let _ = task::ValidateTaskTokenRequest::decode(body);
        }
        _ => {
            // Length-delimited, as a stream of gRPC frames would carry them.
            let _ = workload::JwtsvidRequest::decode_length_delimited(body);
        }
    }
}
