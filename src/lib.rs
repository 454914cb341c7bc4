//! tether (skeleton).
pub mod proto;
pub mod registration;
pub mod attestation;
