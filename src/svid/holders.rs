//! Who holds which X.509-SVID: every open FetchX509SVID stream registers its
//! caller and the serials it was last sent, so operators can see which
//! process holds which identity (`tether svid list`). In memory only: a
//! holder is a live stream, and streams do not survive a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

/// A process holding X.509-SVIDs through an open stream.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The caller's pid.
    pub pid: i32,
    /// The caller's uid.
    pub uid: u32,
    /// The caller's executable, when attested.
    pub executable: Option<PathBuf>,
    /// The caller's selectors, as attested at stream start.
    pub selectors: Vec<String>,
    /// When the stream opened.
    pub since: SystemTime,
    /// Serials (hex) of the SVIDs last sent on the stream.
    pub serials: Vec<String>,
}

/// The registry of holders.
#[derive(Debug, Default)]
pub struct Holders {
    next: AtomicU64,
    streams: Mutex<HashMap<u64, Holder>>,
}

/// A registered holder; dropping it (the stream ended) unregisters it.
#[derive(Debug)]
pub struct HolderHandle {
    holders: Arc<Holders>,
    id: u64,
}

// === impl Holders ===

impl Holders {
    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Holder>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `holder` until the returned handle is dropped.
    pub fn register(self: &Arc<Self>, holder: Holder) -> HolderHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.streams().insert(id, holder);
        HolderHandle {
            holders: Arc::clone(self),
            id,
        }
    }

    /// Every registered holder.
    pub fn all(&self) -> Vec<Holder> {
        self.streams().values().cloned().collect()
    }
}

// === impl HolderHandle ===

impl HolderHandle {
    /// Records what the stream sent last.
    pub fn set_serials(&self, serials: Vec<String>) {
        if let Some(holder) = self.holders.streams().get_mut(&self.id) {
            holder.serials = serials;
        }
    }
}

impl Drop for HolderHandle {
    fn drop(&mut self) {
        self.holders.streams().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_register_update_and_unregister() {
        let holders = Arc::new(Holders::default());
        let holder = Holder {
            pid: 42,
            uid: 1000,
            executable: None,
            selectors: vec!["unix:uid:1000".into()],
            since: SystemTime::now(),
            serials: vec!["aa".into()],
        };
        let a = holders.register(holder.clone());
        let b = holders.register(holder);
        a.set_serials(vec!["bb".into()]);
        let mut serials: Vec<_> = holders.all().into_iter().flat_map(|h| h.serials).collect();
        serials.sort();
        assert_eq!(serials, ["aa", "bb"]);
        drop(a);
        drop(b);
        assert!(holders.all().is_empty());
    }
}
