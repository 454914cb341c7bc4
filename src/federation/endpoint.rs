//! This trust domain's bundle endpoint (SPIFFE Federation, section 4): the
//! bundle, as a SPIFFE bundle document with `spiffe_sequence` and
//! `spiffe_refresh_hint`, at `/`.
