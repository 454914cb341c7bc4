//! Registration entries to and from store rows. A stored row is validated
//! exactly like an operator's request, so a damaged or outdated row stops
//! the start instead of serving a half-understood entry.

use std::collections::BTreeSet;

use spiffe::TrustDomain;

use super::{EntryId, EntrySpec, RegistrationEntry, RegistrationError};
use crate::store::{EntryRow, Store, StoreError};

/// The row for `entry`.
pub(super) fn row(entry: &RegistrationEntry) -> EntryRow {
    let spec = entry.to_spec();
    EntryRow {
        id: entry.id.as_str().to_owned(),
        spiffe_id: spec.spiffe_id,
        selectors: spec.selectors,
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        dns_names: spec.dns_names,
        hint: spec.hint,
        federates_with: spec.federates_with,
        audiences: spec.audiences,
        process_bound: spec.process_bound,
        created_at: entry.created_at,
        updated_at: entry.updated_at,
        revision: entry.revision,
    }
}

/// Every stored entry, validated.
pub(super) fn load(
    store: &Store,
    trust_domain: &TrustDomain,
    federations: &BTreeSet<TrustDomain>,
) -> Result<Vec<RegistrationEntry>, RegistrationError> {
    store
        .entries()?
        .into_iter()
        .map(|row| {
            let stored = |source| RegistrationError::Stored {
                id: row.id.clone(),
                source,
            };
            let id = EntryId::parse(&row.id).map_err(stored)?;
            let spec = EntrySpec {
                spiffe_id: row.spiffe_id.clone(),
                selectors: row.selectors.clone(),
                hint: row.hint.clone(),
                dns_names: row.dns_names.clone(),
                x509_svid_ttl: row.x509_svid_ttl,
                jwt_svid_ttl: row.jwt_svid_ttl,
                federates_with: row.federates_with.clone(),
                audiences: row.audiences.clone(),
                process_bound: row.process_bound,
            };
            RegistrationEntry::from_api(
                &spec,
                trust_domain,
                federations,
                id,
                row.revision,
                row.created_at,
                row.updated_at,
            )
            .map_err(stored)
        })
        .collect()
}

/// A store-level duplicate (a race the in-memory check cannot see, or a
/// row from before a restart) reported like the in-memory one.
pub(super) fn duplicate_or(error: StoreError, entry: &RegistrationEntry) -> RegistrationError {
    match error {
        StoreError::Duplicate { .. } => RegistrationError::Duplicate {
            existing: entry.id.clone(),
        },
        other => RegistrationError::Store(other),
    }
}
