//! tether (skeleton).
pub mod proto;
pub mod registration;
pub mod attestation;
pub mod authority;
pub mod bundle;
