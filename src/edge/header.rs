//! The Workload API security header: every call must carry the gRPC
//! metadata `workload.spiffe.io: true`, exactly once. It is what keeps a
//! browser or a confused server-side request forwarder (SSRF) from reaching
//! the Workload API: such clients cannot set arbitrary headers.

use tonic::{Request, Status};

/// The metadata key.
pub const HEADER: &str = "workload.spiffe.io";

/// A tonic interceptor refusing calls without the header, before any
/// attestation work is done.
pub fn require_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    let mut values = request.metadata().get_all(HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.as_bytes() == b"true" => Ok(request),
        _ => Err(super::status::invalid_argument(
            "security header missing from request: every Workload API call must carry the gRPC metadata workload.spiffe.io: true",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn only_exactly_one_true_passes() {
        assert!(require_security_header(Request::new(())).is_err());
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(HEADER, MetadataValue::from_static("true"));
        assert!(require_security_header(ok).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(HEADER, MetadataValue::from_static("TRUE"));
        assert_eq!(
            require_security_header(wrong).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut twice = Request::new(());
        twice
            .metadata_mut()
            .append(HEADER, MetadataValue::from_static("true"));
        twice
            .metadata_mut()
            .append(HEADER, MetadataValue::from_static("true"));
        assert!(require_security_header(twice).is_err());
    }
}
