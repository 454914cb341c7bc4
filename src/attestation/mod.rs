//! Attestation: from a connected caller to its selectors (work in progress).
