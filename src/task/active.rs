//! The active tasks by owner process: what BeginTask (the per-process
//! limit) and FetchJWTSVID (is this caller inside a task's scope?) ask on
//! every call, answered without walking every task the agent remembers.
//!
//! A task enters when it begins (or is restored active) and leaves exactly
//! once, by whoever moves it from active to ended ([`super::Tasks`] does
//! both under the task's state lock). Owners are keyed by their
//! [`ProcessKey`]: a pid reused by a later process is another owner.

use std::collections::HashMap;
use std::sync::Arc;

use super::Task;
use crate::attestation::ProcessKey;

/// The active tasks of each owner, and the active tasks that scope their
/// owner's descendants.
#[derive(Debug, Default)]
pub(super) struct ActiveIndex {
    owners: HashMap<ProcessKey, OwnerTasks>,
    scopes: HashMap<ProcessKey, Vec<Arc<Task>>>,
}

/// One owner's active tasks (by address: an `Arc<Task>` is one task) and
/// the begins it has under way.
#[derive(Debug, Default)]
struct OwnerTasks {
    tasks: HashMap<usize, Arc<Task>>,
    reserved: usize,
}

// === impl ActiveIndex ===

impl ActiveIndex {
    /// Counts one more active task for `owner` unless it already has
    /// `limit` (begins under way included): `Err(active)` then. Check and
    /// count are one step, so concurrent begins cannot pass the limit
    /// together.
    pub(super) fn reserve(&mut self, owner: ProcessKey, limit: usize) -> Result<(), usize> {
        let entry = self.owners.entry(owner).or_default();
        let active = entry.tasks.len() + entry.reserved;
        if active >= limit {
            self.forget_if_empty(owner);
            return Err(active);
        }
        entry.reserved += 1;
        Ok(())
    }

    /// Undoes a [`ActiveIndex::reserve`] whose task never became active.
    pub(super) fn release(&mut self, owner: ProcessKey) {
        if let Some(entry) = self.owners.get_mut(&owner) {
            entry.reserved = entry.reserved.saturating_sub(1);
        }
        self.forget_if_empty(owner);
    }

    /// Records an active task: begun under a reservation, or restored from
    /// the store.
    pub(super) fn activate(&mut self, task: &Arc<Task>, reserved: bool) {
        let owner = task.owner.process;
        let entry = self.owners.entry(owner).or_default();
        if reserved {
            entry.reserved = entry.reserved.saturating_sub(1);
        }
        entry.tasks.insert(address(task), Arc::clone(task));
        if task.scope_descendants {
            self.scopes.entry(owner).or_default().push(Arc::clone(task));
        }
    }

    /// Forgets a task that has just ended.
    pub(super) fn deactivate(&mut self, task: &Task) {
        let owner = task.owner.process;
        if let Some(entry) = self.owners.get_mut(&owner) {
            entry.tasks.remove(&address(task));
        }
        self.forget_if_empty(owner);
        if task.scope_descendants
            && let Some(scoped) = self.scopes.get_mut(&owner)
        {
            scoped.retain(|t| !std::ptr::eq(Arc::as_ptr(t), task));
            if scoped.is_empty() {
                self.scopes.remove(&owner);
            }
        }
    }

    /// The active tasks of `owner`.
    pub(super) fn of_owner(&self, owner: ProcessKey) -> Vec<Arc<Task>> {
        self.owners
            .get(&owner)
            .map(|entry| entry.tasks.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many active tasks `owner` has (begins under way included).
    #[cfg(test)]
    pub(super) fn count(&self, owner: ProcessKey) -> usize {
        self.owners
            .get(&owner)
            .map_or(0, |entry| entry.tasks.len() + entry.reserved)
    }

    /// True when some active task scopes its owner's descendants.
    pub(super) fn has_scopes(&self) -> bool {
        !self.scopes.is_empty()
    }

    /// The first (oldest) active scoping task of the nearest owner in
    /// `chain`.
    pub(super) fn scope_of(&self, chain: &[ProcessKey]) -> Option<Arc<Task>> {
        chain
            .iter()
            .find_map(|owner| self.scopes.get(owner)?.first().cloned())
    }

    fn forget_if_empty(&mut self, owner: ProcessKey) {
        if self
            .owners
            .get(&owner)
            .is_some_and(|entry| entry.tasks.is_empty() && entry.reserved == 0)
        {
            self.owners.remove(&owner);
        }
    }
}

/// A task's identity in the index: the address of its shared allocation.
fn address(task: &Task) -> usize {
    std::ptr::from_ref(task) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, owner: ProcessKey, scoped: bool) -> Arc<Task> {
        Arc::new(Task::from_row(super::super::tests::test_row(id, owner, scoped)).unwrap())
    }

    #[test]
    fn the_limit_counts_active_tasks_per_owner() {
        let mut index = ActiveIndex::default();
        let (a, b) = (ProcessKey::new(10, 1), ProcessKey::new(10, 2));
        index.reserve(a, 2).unwrap();
        index.reserve(a, 2).unwrap();
        assert_eq!(index.reserve(a, 2), Err(2));
        // Another process with the same pid (a later start) is another owner.
        index.reserve(b, 2).unwrap();
        // A begin that failed gives its place back.
        index.release(a);
        let begun = task("t1", a, false);
        index.activate(&begun, true);
        assert_eq!(index.count(a), 1);
        assert_eq!(index.of_owner(a).len(), 1);
        // An end gives its place back too, and an owner with nothing left
        // is forgotten.
        index.deactivate(&begun);
        assert_eq!(index.count(a), 0);
        assert!(index.of_owner(a).is_empty());
        assert!(!index.owners.contains_key(&a));
        assert_eq!(index.reserve(b, 0), Err(1));
        assert_eq!(index.reserve(ProcessKey::new(11, 1), 0), Err(0));
        assert!(
            !index.owners.contains_key(&ProcessKey::new(11, 1)),
            "no empty owners kept"
        );
    }

    #[test]
    fn scopes_are_found_by_the_nearest_owner_and_leave_when_ended() {
        let mut index = ActiveIndex::default();
        assert!(!index.has_scopes());
        let parent = task("parent", ProcessKey::new(100, 1), true);
        let grandparent = task("grandparent", ProcessKey::new(50, 1), true);
        let unscoped = task("plain", ProcessKey::new(200, 1), false);
        for t in [&parent, &grandparent, &unscoped] {
            index.activate(t, false);
        }
        assert!(index.has_scopes());
        let chain = [
            ProcessKey::new(300, 9),
            ProcessKey::new(200, 1),
            ProcessKey::new(100, 1),
            ProcessKey::new(50, 1),
        ];
        assert_eq!(index.scope_of(&chain).unwrap().id, "parent");
        index.deactivate(&parent);
        assert_eq!(index.scope_of(&chain).unwrap().id, "grandparent");
        index.deactivate(&grandparent);
        assert!(index.scope_of(&chain).is_none());
        assert!(!index.has_scopes());
        assert_eq!(index.count(ProcessKey::new(200, 1)), 1);
    }
}
