//! X.509-SVID issuances in flight, at most one per cache key: requests for
//! the same SVID (same entry, SPIFFE ID and, when process-bound, process)
//! that arrive while it is being issued share that issuance, and so its
//! key pair, its certificate and its one audit record; issuances for
//! different keys run side by side.
//!
//! A flight is a shared future that any of its waiters drives, so a waiter
//! that gives up (its client left) never strands the others. The map holds
//! only a weak handle to each flight, and a flight removes its key when it
//! ends or when its last waiter is gone: the map holds no more flights than
//! there are requests awaiting one. An outcome outlives its flight only in
//! the hands of its waiters; a failure is never cached, so the next request
//! starts a new flight.
//!
//! Invariant: the map's lock is held only to look up, insert or remove a
//! flight (and, before starting one, to read the cache); never while a
//! flight runs.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared, WeakShared};

use super::SvidError;
use super::cache::SvidKey;
use super::x509::X509Svid;

/// What a flight ends with, as each of its waiters gets it.
pub type Issued = Result<Arc<X509Svid>, Arc<SvidError>>;

type Flight = BoxFuture<'static, Issued>;

/// The issuances in flight, by cache key.
#[derive(Default)]
pub struct Flights {
    next: AtomicU64,
    in_flight: Mutex<HashMap<SvidKey, (u64, WeakShared<Flight>)>>,
}

/// Removes its flight from the map when dropped: when the flight ends, or
/// when its last waiter drops it unfinished.
struct Landing {
    flights: Arc<Flights>,
    key: SvidKey,
    id: u64,
}

// === impl Flights ===

impl Flights {
    fn in_flight(&self) -> MutexGuard<'_, HashMap<SvidKey, (u64, WeakShared<Flight>)>> {
        // Every write is one insert or remove: the map is valid after a
        // panic elsewhere.
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcome of the flight for `key`: the one in flight, joined; or,
    /// when there is none, `current()` if it has an SVID to use (one that a
    /// flight ending a moment ago put in the cache); or else a new flight
    /// of `issue()`, awaited here and by whoever joins it meanwhile.
    ///
    /// `current` runs under the map's lock, so it cannot miss an SVID a
    /// flight put in the cache before landing (a flight caches its SVID,
    /// then lands). `issue` runs only when a flight starts.
    pub async fn issue_once<F>(
        self: &Arc<Self>,
        key: &SvidKey,
        current: impl FnOnce() -> Option<Arc<X509Svid>>,
        issue: impl FnOnce() -> F,
    ) -> Issued
    where
        F: Future<Output = Result<Arc<X509Svid>, SvidError>> + Send + 'static,
    {
        let flight = {
            let mut in_flight = self.in_flight();
            if let Some(flight) = in_flight.get(key).and_then(|(_, weak)| weak.upgrade()) {
                flight
            } else {
                if let Some(svid) = current() {
                    return Ok(svid);
                }
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                let landing = Landing {
                    flights: Arc::clone(self),
                    key: key.clone(),
                    id,
                };
                let issuing = issue();
                let flight: Shared<Flight> = async move {
                    let _landing = landing;
                    issuing.await.map_err(Arc::new)
                }
                .boxed()
                .shared();
                // Only a finished flight has no weak handle; this one has
                // not been polled yet.
                if let Some(weak) = flight.downgrade() {
                    in_flight.insert(key.clone(), (id, weak));
                }
                flight
            }
        };
        flight.await
    }

    /// How many flights are in the map (for tests: none once all ended).
    pub fn len(&self) -> usize {
        self.in_flight().len()
    }

    /// True when no flight is in the map.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Flights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &self.len())
            .finish()
    }
}

// === impl Landing ===

impl Drop for Landing {
    fn drop(&mut self) {
        let mut in_flight = self.flights.in_flight();
        // A new flight may already have taken the key if this one was
        // dropped by its last waiter: leave that one.
        if in_flight
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            in_flight.remove(&self.key);
        }
    }
}
