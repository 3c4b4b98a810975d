//! The lease table: leases with their deadlines, ordered so the next expiry is found at once.
//! Pure bookkeeping on `tokio::time::Instant` (testable on paused time); the engine reverts the
//! faults of the leases this table hands back as expired.

use std::collections::{BTreeSet, HashMap};
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
}

impl LeaseTable {
    pub fn insert(&mut self, lease: Lease) {
        self.deadlines.insert((lease.deadline, lease.id.clone()));
        self.leases.insert(lease.id.clone(), lease);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.leases.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Lease> {
        self.leases.get_mut(id)
    }

    /// Moves the deadline to `now + ttl`.
    pub fn renew(&mut self, id: &str, now: Instant) -> Option<&Lease> {
        let lease = self.leases.get_mut(id)?;
        self.deadlines.remove(&(lease.deadline, lease.id.clone()));
        lease.deadline = now + lease.ttl;
        self.deadlines.insert((lease.deadline, lease.id.clone()));
        Some(lease)
    }

    pub fn remove(&mut self, id: &str) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.deadlines.remove(&(lease.deadline, lease.id.clone()));
        Some(lease)
    }

    /// The earliest deadline of all leases.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Removes and returns every lease whose deadline is at or before `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Lease> {
        let mut expired = Vec::new();
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            if let Some((_, id)) = self.deadlines.pop_first()
                && let Some(lease) = self.leases.remove(&id)
            {
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
