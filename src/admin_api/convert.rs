//! Admin API messages to and from domain values.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Status;

use crate::bundle::{BundleError, TrustBundle};
use crate::edge::status;
use crate::proto::admin as pb;
use crate::registration::{EntrySource, EntrySpec, RegistrationEntry};

/// Most selectors, DNS names or federations one request may list; the
/// domain checks tighter limits with field names, this only stops absurd
/// requests before any work.
const MAX_LIST: usize = 256;
/// Longest string accepted in an entry spec.
const MAX_STRING: usize = 4096;

/// A spec from the wire, bounded.
pub fn spec(spec: Option<pb::EntrySpec>) -> Result<EntrySpec, Status> {
    let spec = spec.ok_or_else(|| status::invalid("spec", "is required"))?;
    for (field, list) in [
        ("selectors", &spec.selectors),
        ("dns_names", &spec.dns_names),
        ("federates_with", &spec.federates_with),
        ("audiences", &spec.audiences),
    ] {
        if list.len() > MAX_LIST {
            return Err(status::invalid(
                field,
                format!("{} items; the limit is {MAX_LIST}", list.len()),
            ));
        }
        if let Some(long) = list.iter().find(|s| s.len() > MAX_STRING) {
            return Err(status::invalid(
                field,
                format!("an item is {} bytes long", long.len()),
            ));
        }
    }
    if spec.spiffe_id.is_empty() {
        return Err(status::invalid("spiffe_id", "is required"));
    }
    if spec.spiffe_id.len() > MAX_STRING || spec.hint.len() > MAX_STRING {
        return Err(status::invalid("spiffe_id or hint", "too long"));
    }
    let ttl = |ms: u64| (ms != 0).then(|| Duration::from_millis(ms));
    Ok(EntrySpec {
        spiffe_id: spec.spiffe_id,
        selectors: spec.selectors,
        hint: (!spec.hint.is_empty()).then_some(spec.hint),
        dns_names: spec.dns_names,
        x509_svid_ttl: ttl(spec.x509_svid_ttl_ms),
        jwt_svid_ttl: ttl(spec.jwt_svid_ttl_ms),
        federates_with: spec.federates_with,
        audiences: spec.audiences,
        process_bound: spec.process_bound,
    })
}

/// An entry for the wire.
pub fn entry(entry: &RegistrationEntry) -> pb::Entry {
    let spec = entry.to_spec();
    let ms =
        |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    pb::Entry {
        id: entry.id.to_string(),
        spec: Some(pb::EntrySpec {
            spiffe_id: spec.spiffe_id,
            selectors: spec.selectors,
            x509_svid_ttl_ms: ms(spec.x509_svid_ttl),
            jwt_svid_ttl_ms: ms(spec.jwt_svid_ttl),
            dns_names: spec.dns_names,
            hint: spec.hint.unwrap_or_default(),
            federates_with: spec.federates_with,
            audiences: spec.audiences,
            process_bound: spec.process_bound,
        }),
        source: match entry.source {
            EntrySource::Config => pb::EntrySource::Config,
            EntrySource::Api => pb::EntrySource::Api,
            EntrySource::Server => pb::EntrySource::Server,
        }
        .into(),
        revision: entry.revision,
        created_at_ms: unix_ms(entry.created_at),
        updated_at_ms: unix_ms(entry.updated_at),
    }
}

/// A trust bundle for the wire (the agent's `GetBundle`, and the fleet
/// server's): the SPIFFE bundle document and the X.509 authorities.
pub fn bundle(bundle: &TrustBundle) -> Result<pb::Bundle, BundleError> {
    Ok(pb::Bundle {
        trust_domain: bundle.trust_domain().to_string(),
        spiffe_json: bundle.to_spiffe_json()?,
        x509_authorities: bundle.x509_authorities().to_vec(),
        sequence: bundle.sequence(),
    })
}

/// Unix milliseconds.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
