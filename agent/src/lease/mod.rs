//! The lease table: leases with their deadlines, ordered so the next expiry is found at once.
//! Pure bookkeeping on `tokio::time::Instant` (testable on paused time); the engine reverts the
//! faults of the leases this table hands back as expired.
//!
//! The table mirrors each lease into a `Directory` behind a lock of its own, which nothing
//! holds for more than a map operation: a renewal that finds the engine busy with kernel or
//! iptables work is answered from it at once and recorded there, and the engine applies it
//! before it next looks at deadlines. A lease with a renewal recorded is never expired.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::fault::{FaultId, Labels, LeaseId};

#[derive(Clone, Debug)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
    pub deadline: Instant,
    /// Faults under this lease, in insertion order.
    pub faults: Vec<FaultId>,
    /// Granted by the agent for an Inject that carried a ttl; gone with its last fault.
    pub private: bool,
    pub labels: Labels,
}

#[derive(Default)]
pub struct LeaseTable {
    leases: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    directory: Directory,
}

/// The leases as renewals see them, and the renewals not applied to the table yet.
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<Mutex<DirectoryInner>>,
}

#[derive(Default)]
struct DirectoryInner {
    leases: HashMap<LeaseId, Lease>,
    /// Lease → when it was renewed last, for renewals the table has not seen.
    pending: HashMap<LeaseId, Instant>,
}

impl Directory {
    fn lock(&self) -> MutexGuard<'_, DirectoryInner> {
        // Every operation leaves the maps consistent: a panic elsewhere cannot break them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a renewal of lease `id` at `now` for the table to apply, and answers with the
    /// lease and its new deadline; None if there is no such lease.
    /// A lease already past its deadline is not renewed (it is expiring). The answer is the lease
    /// as the table last wrote it, with its new deadline.
    pub fn renew(&self, id: &str, now: Instant) -> Option<Lease> {
        let mut inner = self.lock();
        let lease = inner.leases.get_mut(id)?;
        if lease.deadline <= now {
            return None;
        }
        lease.deadline = lease.deadline.max(now + lease.ttl);
        let renewed = lease.clone();
        inner.pending.insert(renewed.id.clone(), now);
        Some(renewed)
    }
}

impl LeaseTable {
    /// The directory renewals use when the engine is busy.
    pub fn directory(&self) -> Directory {
        self.directory.clone()
    }

    pub fn insert(&mut self, lease: Lease) {
        self.deadlines.insert((lease.deadline, lease.id.clone()));
        self.directory
            .lock()
            .leases
            .insert(lease.id.clone(), lease.clone());
        self.leases.insert(lease.id.clone(), lease);
    }

    /// Puts fault `fault` under lease `id`.
    pub fn add_fault(&mut self, id: &str, fault: &FaultId) {
        if let Some(lease) = self.leases.get_mut(id) {
            lease.faults.push(fault.clone());
            if let Some(mirror) = self.directory.lock().leases.get_mut(id) {
                mirror.faults.push(fault.clone());
            }
        }
    }

    /// Takes fault `fault` off lease `id`.
    pub fn remove_fault(&mut self, id: &str, fault: &str) {
        if let Some(lease) = self.leases.get_mut(id) {
            lease.faults.retain(|f| f != fault);
            if let Some(mirror) = self.directory.lock().leases.get_mut(id) {
                mirror.faults.retain(|f| f != fault);
            }
        }
    }

    /// The renewals recorded in the directory since the last call, oldest lease first: the
    /// caller renews each in the table (`renew`) at its instant.
    pub fn take_pending(&mut self) -> Vec<(LeaseId, Instant)> {
        let mut pending: Vec<(LeaseId, Instant)> = self.directory.lock().pending.drain().collect();
        pending.sort_by_key(|(_, at)| *at);
        pending
    }

    pub fn contains(&self, id: &str) -> bool {
        self.leases.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// Moves the deadline to `now + ttl`.
    pub fn renew(&mut self, id: &str, now: Instant) -> Option<&Lease> {
        let lease = self.leases.get_mut(id)?;
        self.deadlines.remove(&(lease.deadline, lease.id.clone()));
        lease.deadline = lease.deadline.max(now + lease.ttl);
        self.deadlines.insert((lease.deadline, lease.id.clone()));
        if let Some(mirror) = self.directory.lock().leases.get_mut(id) {
            mirror.deadline = lease.deadline;
        }
        Some(lease)
    }

    pub fn remove(&mut self, id: &str) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.deadlines.remove(&(lease.deadline, lease.id.clone()));
        let mut directory = self.directory.lock();
        directory.leases.remove(id);
        directory.pending.remove(id);
        Some(lease)
    }

    /// The earliest deadline of all leases.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Removes and returns every lease whose deadline is at or before `now`, but for those with
    /// a renewal recorded in the directory (the caller applies those with `take_pending`, then
    /// asks again). Decided under the directory's lock, so a renewal either counts or finds
    /// the lease gone.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Lease> {
        let mut directory = self.directory.lock();
        let due: Vec<LeaseId> = self
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .filter(|(_, id)| !directory.pending.contains_key(id))
            .map(|(_, id)| id.clone())
            .collect();
        let mut expired = Vec::new();
        for id in due {
            directory.leases.remove(&id);
            if let Some(lease) = self.leases.remove(&id) {
                self.deadlines.remove(&(lease.deadline, id));
                expired.push(lease);
            }
        }
        expired
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn ids(&self) -> Vec<LeaseId> {
        self.leases.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, ttl: u64, now: Instant) -> Lease {
        Lease {
            id: id.into(),
            ttl: Duration::from_secs(ttl),
            deadline: now + Duration::from_secs(ttl),
            faults: vec![],
            private: false,
            labels: Labels::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expires_in_deadline_order_and_not_before() {
        let now = Instant::now();
        let mut table = LeaseTable::default();
        table.insert(lease("b", 2, now));
        table.insert(lease("a", 1, now));
        assert_eq!(table.next_deadline(), Some(now + Duration::from_secs(1)));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(table.take_expired(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let expired: Vec<_> = table
            .take_expired(Instant::now())
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(expired, ["a"]);
        assert!(table.contains("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_recorded_in_the_directory_keeps_the_lease_until_applied() {
        let now = Instant::now();
        let mut table = LeaseTable::default();
        table.insert(lease("a", 1, now));
        table.add_fault("a", &"f1".to_string());
        let directory = table.directory();
        tokio::time::advance(Duration::from_millis(900)).await;
        let renewed = directory
            .renew("a", Instant::now())
            .expect("lease a exists");
        assert_eq!(renewed.deadline, Instant::now() + Duration::from_secs(1));
        assert_eq!(renewed.faults, ["f1"]);
        tokio::time::advance(Duration::from_millis(500)).await;
        // Past the old deadline: the recorded renewal holds the lease.
        assert!(table.take_expired(Instant::now()).is_empty());
        for (id, at) in table.take_pending() {
            table.renew(&id, at);
        }
        assert!(table.take_expired(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(table.take_expired(Instant::now()).len(), 1);
        assert!(
            directory.renew("a", Instant::now()).is_none(),
            "expired: gone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renew_moves_the_deadline() {
        let now = Instant::now();
        let mut table = LeaseTable::default();
        table.insert(lease("a", 1, now));
        tokio::time::advance(Duration::from_millis(800)).await;
        table.renew("a", Instant::now());
        tokio::time::advance(Duration::from_millis(800)).await;
        assert!(table.take_expired(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(table.take_expired(Instant::now()).len(), 1);
        assert!(table.is_empty());
        assert_eq!(table.next_deadline(), None);
    }
}
