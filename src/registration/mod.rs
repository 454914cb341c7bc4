//! Registration: who gets which SPIFFE ID.
//!
//! Owns [`RegistrationEntry`] (selectors -> SPIFFE ID), the [`Registry`] that
//! holds the current set, and the subset matching that decides which entries a
//! caller's selectors satisfy. It never reads the operating system: the
//! selectors it matches come from `attestation`.

pub mod selector;
