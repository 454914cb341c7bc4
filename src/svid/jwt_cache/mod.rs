//! The JWT-SVID cache: a signed JWT-SVID is served again, to callers that
//! ask for the same identity and the same audiences, while more than half
//! of its life remains, as SPIRE's agent does. In fleet mode that spares
//! a FetchJWTSVID the round trip to the server; standalone it spares a
//! signature. The cache applies in both modes: `svid` cannot tell them
//! apart, and a token served twice is what every SPIFFE agent does.
//!
//! The key is what makes two tokens' claims differ: the entry (its
//! `jwt_svid_ttl` and hint), the SPIFFE ID it resolved to, and the
//! audiences as a set (sorted, duplicates removed). `iat`, `exp` and
//! `jti` are the token's own.
//!
//! Invariants:
//! - the cache is only reached with a [`Match`](crate::registration::Match)
//!   that the caller's attestation produced and policy allowed: it sits
//!   after every check and never decides who gets a token;
//! - a token is never served past half its life, nor once the clock has
//!   stepped back before its `iat`, nor when its entry changed what the
//!   token says, nor once its `kid` left the bundle;
//! - it is bounded: [`MAX_CACHED`] tokens in all and
//!   [`MAX_CACHED_PER_IDENTITY`] per (entry, SPIFFE ID), each bound
//!   evicting the least recently used, so a workload that asks for ever
//!   new audiences (caller input) only churns its own tokens;
//! - the tokens of an entry that is removed or changed are dropped
//!   ([`JwtSvidCache::retain_current`], on every registry change).
//!
//! Concurrent misses for one key each sign, and the last one cached stays:
//! unlike an X.509-SVID (a key pair and a certificate), a JWT costs one
//! signature, so misses share no flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use spiffe::SpiffeId;

use super::jwt::JwtSvid;
use crate::registration::{EntryId, EntrySet, RegistrationEntry};

/// Most JWT-SVIDs cached in all (SPIRE's agent default is 1000).
pub const MAX_CACHED: usize = 1024;
/// Most JWT-SVIDs cached for one identity (entry and SPIFFE ID): distinct
/// audience sets beyond it evict that identity's least recently used.
pub const MAX_CACHED_PER_IDENTITY: usize = 64;

/// An identity: the entry and the SPIFFE ID it resolved to.
type Identity = (EntryId, SpiffeId);
/// Audiences as a set: sorted, without duplicates.
type Audiences = Vec<String>;

/// Signed JWT-SVIDs served again until half their life. Cheap to share
/// behind an `Arc`; every method takes the lock briefly and never awaits.
#[derive(Debug)]
pub struct JwtSvidCache {
    inner: Mutex<Inner>,
    max_total: usize,
    max_per_identity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    identities: HashMap<Identity, Slots>,
    /// Every cached token by last use: the global eviction order.
    order: BTreeMap<u64, (Identity, Audiences)>,
    /// The use counter (a logical clock: never the wall clock).
    tick: u64,
}

/// The tokens of one identity, by audience set.
#[derive(Debug, Default)]
struct Slots {
    by_audiences: HashMap<Audiences, Slot>,
    /// This identity's tokens by last use.
    order: BTreeMap<u64, Audiences>,
}

#[derive(Debug)]
struct Slot {
    svid: JwtSvid,
    /// What the entry said when the token was signed.
    issued_for: Arc<RegistrationEntry>,
    /// `iat`: the token is not served if the clock is now before it.
    issued_at: SystemTime,
    /// Half its life: served while the clock is before it.
    serve_until: SystemTime,
    last_used: u64,
}

// === impl JwtSvidCache ===

impl Default for JwtSvidCache {
    fn default() -> Self {
        Self::with_bounds(MAX_CACHED, MAX_CACHED_PER_IDENTITY)
    }
}

impl JwtSvidCache {
    /// A cache holding at most `max_total` tokens, `max_per_identity` of
    /// them for one identity (each at least one).
    pub fn with_bounds(max_total: usize, max_per_identity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_total: max_total.max(1),
            max_per_identity: max_per_identity.max(1),
        }
    }

    /// The cached token of `entry` as `spiffe_id` for `audiences` (in any
    /// order), if it still has more than half its life at `now`, its entry
    /// has not changed what it says, and `kid_trusted` says its signing
    /// key is still in the bundle. A token that fails any of these is
    /// dropped.
    pub fn get(
        &self,
        entry: &RegistrationEntry,
        spiffe_id: &SpiffeId,
        audiences: &[String],
        now: SystemTime,
        kid_trusted: impl FnOnce(&str) -> bool,
    ) -> Option<JwtSvid> {
        let identity = (entry.id.clone(), spiffe_id.clone());
        let audiences = audience_set(audiences);
        let mut inner = self.lock();
        let slot = inner
            .identities
            .get(&identity)?
            .by_audiences
            .get(&audiences)?;
        let usable = now >= slot.issued_at
            && now < slot.serve_until
            && !is_stale_for(&slot.issued_for, entry)
            && kid_trusted(&slot.svid.kid);
        if !usable {
            inner.remove(&identity, &audiences);
            return None;
        }
        let tick = inner.next_tick();
        let Inner {
            identities, order, ..
        } = &mut *inner;
        let slots = identities.get_mut(&identity)?;
        let slot = slots.by_audiences.get_mut(&audiences)?;
        let svid = slot.svid.clone();
        let previous = std::mem::replace(&mut slot.last_used, tick);
        if let Some(key) = order.remove(&previous) {
            order.insert(tick, key);
        }
        if let Some(key) = slots.order.remove(&previous) {
            slots.order.insert(tick, key);
        }
        Some(svid)
    }

    /// Caches `svid`, signed at `issued_at` for `entry` as its SPIFFE ID
    /// and for `audiences`, replacing the token cached for the same key and
    /// evicting the least recently used beyond either bound. A token whose
    /// half life is already over is not cached.
    pub fn put(
        &self,
        entry: &Arc<RegistrationEntry>,
        audiences: &[String],
        svid: JwtSvid,
        issued_at: SystemTime,
    ) {
        let life = svid.expiry.duration_since(issued_at).unwrap_or_default();
        let serve_until = issued_at + life / 2;
        if serve_until <= issued_at {
            return;
        }
        let identity = (entry.id.clone(), svid.spiffe_id.clone());
        let audiences = audience_set(audiences);
        let mut inner = self.lock();
        inner.remove(&identity, &audiences);
        let tick = inner.next_tick();
        let Inner {
            identities, order, ..
        } = &mut *inner;
        let slots = identities.entry(identity.clone()).or_default();
        while slots.by_audiences.len() >= self.max_per_identity {
            let Some((_, oldest)) = slots.order.pop_first() else {
                break;
            };
            if let Some(slot) = slots.by_audiences.remove(&oldest) {
                order.remove(&slot.last_used);
            }
        }
        slots.order.insert(tick, audiences.clone());
        slots.by_audiences.insert(
            audiences.clone(),
            Slot {
                svid,
                issued_for: Arc::clone(entry),
                issued_at,
                serve_until,
                last_used: tick,
            },
        );
        order.insert(tick, (identity, audiences));
        while inner.order.len() > self.max_total {
            let Some((_, (identity, audiences))) = inner.order.first_key_value() else {
                break;
            };
            let (identity, audiences) = (identity.clone(), audiences.clone());
            inner.remove(&identity, &audiences);
        }
    }

    /// Drops the tokens of entries that are gone from `entries` or changed
    /// what their tokens say. Returns how many were dropped.
    pub fn retain_current(&self, entries: &EntrySet) -> usize {
        self.retain_with(|id| entries.get(id).map(|entry| &**entry))
    }

    /// [`Self::retain_current`] with `current` saying what each entry is
    /// now (`None`: gone).
    fn retain_with<'a>(
        &self,
        current: impl Fn(&EntryId) -> Option<&'a RegistrationEntry>,
    ) -> usize {
        let mut inner = self.lock();
        let stale: Vec<(Identity, Audiences)> = inner
            .identities
            .iter()
            .flat_map(|(identity, slots)| {
                let now = current(&identity.0);
                slots
                    .by_audiences
                    .iter()
                    .filter(move |(_, slot)| {
                        now.is_none_or(|entry| is_stale_for(&slot.issued_for, entry))
                    })
                    .map(move |(audiences, _)| (identity.clone(), audiences.clone()))
            })
            .collect();
        for (identity, audiences) in &stale {
            inner.remove(identity, audiences);
        }
        stale.len()
    }

    /// How many tokens are cached.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves `Inner` consistent before it could panic (no
        // user code runs under the lock), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn remove(&mut self, identity: &Identity, audiences: &Audiences) {
        let Some(slots) = self.identities.get_mut(identity) else {
            return;
        };
        if let Some(slot) = slots.by_audiences.remove(audiences) {
            slots.order.remove(&slot.last_used);
            self.order.remove(&slot.last_used);
        }
        if slots.by_audiences.is_empty() {
            self.identities.remove(identity);
        }
    }
}

/// True when `entry` now says something a token signed for `was` says
/// otherwise: its SPIFFE ID (template), its JWT-SVID lifetime, its hint.
fn is_stale_for(was: &RegistrationEntry, entry: &RegistrationEntry) -> bool {
    was.spiffe_id != entry.spiffe_id
        || was.jwt_svid_ttl != entry.jwt_svid_ttl
        || was.hint != entry.hint
}

fn audience_set(audiences: &[String]) -> Audiences {
    let mut set = audiences.to_vec();
    set.sort_unstable();
    set.dedup();
    set
}

#[cfg(test)]
mod tests;
