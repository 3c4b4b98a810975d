//! A fault's placement in one network namespace: its lane, its rules, and how they are put in
//! (`place`, all or nothing across address families) and taken out (`unplace`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::lane::Lane;
use super::queue::{QUEUE_COUNT, QUEUE_FIRST};
use super::{NfqueueShaper, shaper_error};
use crate::dataplane::clock::monotonic_now_ns;
use crate::dataplane::netfilter::{self, Family, FaultRules, Hook, Listing, Matcher};
use crate::dataplane::{DataplaneError, Shaped};
use crate::fault::{Direction, Mechanism};
use crate::instance::Instance;
use crate::target::namespaces::NetNs;

/// A fault's lane and rules in one network namespace.
pub(super) struct Placement {
    pub(super) netns: Arc<NetNs>,
    pub(super) lane: Lane,
    pub(super) rules: FaultRules,
    /// The `-A` lines in force per family (they change with the deadline), for their removal.
    pub(super) lines: Vec<(Family, Vec<String>)>,
}

impl Placement {
    /// Moves the kernel-side deadline to `until` (Unix seconds): returns, per family, the
    /// transaction that swaps the rules in force for ones with the new deadline.
    pub(super) fn move_deadline(&mut self, until: u64) -> Vec<(Family, Vec<String>)> {
        self.rules.until = Some(until);
        let mut swaps = Vec::new();
        for (family, lines) in &mut self.lines {
            let fresh = self.rules.lines(*family);
            let mut swap = netfilter::deletion(lines);
            swap.extend(fresh.iter().cloned());
            *lines = fresh;
            swaps.push((*family, swap));
        }
        swaps
    }
}

/// Seconds the kernel-side deadline (`-m time --datestop`) may trail the lease deadline: the
/// rule is rewritten in the background on each renewal, and must not lapse before it.
pub(super) const BACKSTOP_MARGIN_SECS: u64 = 1;

/// The last Unix second in which the rules of a fault with this deadline (CLOCK_MONOTONIC ns)
/// queue packets.
pub(super) fn backstop_until(expires_at_ns: u64) -> u64 {
    let left = expires_at_ns.saturating_sub(monotonic_now_ns());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // The rule matches through this whole second: it ends 1 to 2 s after the deadline.
    (now + Duration::from_nanos(left)).as_secs() + BACKSTOP_MARGIN_SECS
}

impl NfqueueShaper {
    pub(super) fn place(
        &mut self,
        fault: &Shaped<'_>,
        matcher: &Matcher,
        netns: Arc<NetNs>,
        families: &[Family],
    ) -> Result<Placement, DataplaneError> {
        let instance = self.instance.clone();
        let lookup = netns.clone();
        let fams = families.to_vec();
        // Listing (and sweeping the dead) runs after any clean-up still queued.
        let listings = self
            .worker
            .call(move || {
                fams.iter()
                    .map(|family| {
                        let listing = netfilter::list(*family, Some(&lookup))?;
                        for owner in listing.owners() {
                            if owner != instance && !Instance::is_alive(&owner) {
                                netfilter::restore(
                                    *family,
                                    Some(&lookup),
                                    &listing.removal(&owner),
                                )?;
                            }
                        }
                        Ok((*family, listing))
                    })
                    .collect::<Result<Vec<(Family, Listing)>, String>>()
            })
            .and_then(|r| r)
            .map_err(shaper_error)?;
        let mut taken = BTreeSet::new();
        let mut marks = BTreeSet::new();
        for (_, listing) in &listings {
            taken.extend(listing.queues());
            marks.extend(listing.mark_ids());
        }
        // Only a cgroup's ingress needs a conntrack mark (an interface's has its own hook).
        let ingress = matches!(fault.target.direction, Direction::Ingress | Direction::Both);
        let mark_id = match ingress && matches!(matcher, Matcher::Cgroup(_)) {
            false => None,
            true => Some(
                (1..=netfilter::MAX_MARK_ID)
                    .find(|id| !marks.contains(id))
                    .ok_or_else(|| DataplaneError::Exhausted {
                        mechanism: Mechanism::Nfqueue.name(),
                        reason: format!(
                            "all {} connection-mark ids for ingress faults are in use in this \
                             network namespace",
                            netfilter::MAX_MARK_ID
                        ),
                    })?,
            ),
        };
        let lane = Lane::start(
            netns.clone(),
            fault.action,
            fault.expires_at_ns,
            taken,
            self.next_queue,
        )
        .map_err(shaper_error)?;
        self.next_queue = QUEUE_FIRST + (lane.queue - QUEUE_FIRST + 1) % QUEUE_COUNT;
        let rules = FaultRules {
            instance: self.instance.clone(),
            fault: fault.id.clone(),
            matcher: matcher.clone(),
            protocol: fault.target.protocol,
            direction: fault.target.direction,
            ports: fault.target.ports.clone(),
            queue: lane.queue,
            mark_id,
            until: Some(backstop_until(fault.expires_at_ns)),
            peers: fault
                .target
                .peer_set()
                .map_err(|e| shaper_error(e.reason))?,
        };
        // Per family, the restore lines: the agent's chains this fault needs and lacks, then
        // the fault's own chains and rules.
        let batches: Vec<(Family, Vec<String>)> = listings
            .iter()
            .map(|(family, listing)| {
                let missing: Vec<Hook> = rules
                    .hooks()
                    .into_iter()
                    .filter(|hook| !listing.has_chain(&netfilter::chain(&self.instance, *hook)))
                    .collect();
                let mut lines = netfilter::chain_creation(&self.instance, &missing);
                lines.extend(rules.setup(*family));
                lines.extend(rules.lines(*family));
                (*family, lines)
            })
            .collect();
        self.record_netns(netns.inode());
        let apply_ns = netns.clone();
        let apply = batches.clone();
        let applied = self
            .worker
            .call(move || {
                let mut done: Vec<&(Family, Vec<String>)> = Vec::new();
                for batch in &apply {
                    let (family, lines) = batch;
                    if let Err(e) = netfilter::restore(*family, Some(&apply_ns), lines) {
                        // All or nothing: take out what the other family got.
                        for (family, lines) in done {
                            let undone = netfilter::restore(
                                *family,
                                Some(&apply_ns),
                                &netfilter::undo(lines),
                            );
                            if let Err(e) = undone {
                                tracing::warn!(error = %e, "undoing NFQUEUE rules");
                            }
                        }
                        return Err(format!("{} rules: {e}", family.name()));
                    }
                    done.push(batch);
                }
                Ok(())
            })
            .and_then(|r| r);
        if let Err(e) = applied {
            // The lane goes (Drop) and with it the queue.
            return Err(shaper_error(e));
        }
        let lines = batches
            .iter()
            .map(|(family, _)| (*family, rules.lines(*family)))
            .collect();
        Ok(Placement {
            netns,
            lane,
            rules,
            lines,
        })
    }

    /// Stops delaying at once (the lane passes everything from now on); the rules go in the
    /// background, then the lane, so that no packet is left in a queue nobody reads.
    pub(super) fn unplace(&mut self, placement: Placement) {
        placement.lane.refresh(0);
        let inode = placement.netns.inode();
        let last = match self.in_use.get_mut(&inode) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.in_use.remove(&inode);
                true
            }
        };
        let instance = self.instance.clone();
        self.worker.spawn(move || {
            let Placement {
                netns,
                mut lane,
                rules,
                lines,
            } = placement;
            for (family, lines) in &lines {
                let mut own = netfilter::deletion(lines);
                own.extend(rules.teardown(*family));
                if let Err(e) = netfilter::restore(*family, Some(&netns), &own) {
                    tracing::warn!(error = %e, netns = %netns.path().display(), "removing NFQUEUE rules");
                }
                if last {
                    let removed = netfilter::list(*family, Some(&netns)).and_then(|listing| {
                        netfilter::restore(*family, Some(&netns), &listing.removal(&instance))
                    });
                    if let Err(e) = removed {
                        tracing::warn!(error = %e, netns = %netns.path().display(), "removing faultd's chains");
                    }
                }
            }
            lane.join();
        });
    }
}
