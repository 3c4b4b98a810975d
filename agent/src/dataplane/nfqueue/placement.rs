//! A fault's placement in one network namespace: its lane, its rules, and how they are put in
//! (`place`, all or nothing across address families) and taken out (`unplace`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::cleanup::remove_rules;
use super::error::NfqueueError;
use super::lane::Lane;
use super::queue::{QUEUE_COUNT, QUEUE_FIRST};
use super::sweep::list_sweeping;
use super::{NfqueueShaper, shaper_error};
use crate::claims::HostLock;
use crate::dataplane::clock::monotonic_now_ns;
use crate::dataplane::netfilter::{self, Family, FaultRules, Hook, Listing, Matcher, TcpFlags};
use crate::dataplane::{DataplaneError, Shaped};
use crate::fault::{Direction, Mechanism};
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
        swap_lines(&mut self.lines, |family| self.rules.lines(family))
    }
}

/// Per family, the transaction that swaps the `-A` lines in force for `fresh` ones (rules with
/// a new deadline); `lines` becomes the fresh ones.
pub(super) fn swap_lines(
    lines: &mut [(Family, Vec<String>)],
    fresh: impl Fn(Family) -> Vec<String>,
) -> Vec<(Family, Vec<String>)> {
    let mut swaps = Vec::new();
    for (family, lines) in lines {
        let fresh = fresh(*family);
        let mut swap = netfilter::deletion(lines);
        swap.extend(fresh.iter().cloned());
        *lines = fresh;
        swaps.push((*family, swap));
    }
    swaps
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
    /// Puts `fault`'s lane and rules in `netns`, all or nothing: reads what is there (sweeping
    /// dead agents), picks a free queue number and mark id, starts the lane, and applies the
    /// rules of every family in one transaction each.
    pub(super) fn place(
        &mut self,
        fault: &Shaped<'_>,
        matcher: &Matcher,
        netns: Arc<NetNs>,
        families: &[Family],
    ) -> Result<Placement, DataplaneError> {
        // Other instances choose from the same listing: one at a time, until ours are in.
        let _host = match &self.host_lock {
            Some(path) => Some(
                HostLock::take(path).map_err(|source| NfqueueError::HostLock {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let listings = self.listings(&netns, families)?;
        let mut taken = BTreeSet::new();
        let mut marks = BTreeSet::new();
        for (_, listing) in &listings {
            taken.extend(listing.queues());
            marks.extend(listing.mark_ids());
        }
        let mark_id = free_mark_id(fault, matcher, &marks)?;
        let lane = Lane::start(
            netns.clone(),
            fault.action,
            fault.target.request.clone(),
            fault.expires_at_ns,
            taken,
            self.next_queue,
        )?;
        self.next_queue = QUEUE_FIRST + (lane.queue - QUEUE_FIRST + 1) % QUEUE_COUNT;
        let rules = self.rules_of(fault, matcher, lane.queue, mark_id)?;
        let batches = self.batches(&rules, &listings);
        self.record_netns(netns.inode());
        // On error the lane goes (Drop) and with it the queue.
        self.apply(&netns, batches.clone())?;
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

    /// The mangle table of `netns` per family, once the dead agents' chains there are swept.
    /// Runs after any clean-up still queued.
    fn listings(
        &self,
        netns: &Arc<NetNs>,
        families: &[Family],
    ) -> Result<Vec<(Family, Listing)>, DataplaneError> {
        let instance = self.instance.clone();
        let netns = netns.clone();
        let families = families.to_vec();
        self.worker
            .call(move || {
                families
                    .iter()
                    .map(|family| Ok((*family, list_sweeping(*family, &netns, &instance)?)))
                    .collect::<Result<Vec<(Family, Listing)>, NfqueueError>>()
            })
            .and_then(|r| r)
            .map_err(DataplaneError::from)
    }

    /// The rules of `fault` in one namespace, sent to `queue`.
    fn rules_of(
        &self,
        fault: &Shaped<'_>,
        matcher: &Matcher,
        queue: u16,
        mark_id: Option<u8>,
    ) -> Result<FaultRules, DataplaneError> {
        Ok(FaultRules {
            instance: self.instance.clone(),
            fault: fault.id.clone(),
            matcher: matcher.clone(),
            protocol: fault.target.protocol,
            direction: fault.target.direction,
            ports: fault.target.ports.clone(),
            queue,
            mark_id,
            tcp_flags: TcpFlags::of(fault.action),
            until: Some(backstop_until(fault.expires_at_ns)),
            peers: fault
                .target
                .peer_set()
                .map_err(|e| shaper_error(e.reason))?,
        })
    }

    /// Per family, the restore lines: the agent's chains this fault needs and lacks, then the
    /// fault's own chains and rules.
    fn batches(
        &self,
        rules: &FaultRules,
        listings: &[(Family, Listing)],
    ) -> Vec<(Family, Vec<String>)> {
        listings
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
            .collect()
    }

    /// Applies `batches` in `netns` on the worker, all or nothing.
    fn apply(
        &self,
        netns: &Arc<NetNs>,
        batches: Vec<(Family, Vec<String>)>,
    ) -> Result<(), DataplaneError> {
        let netns = netns.clone();
        self.worker
            .call(move || apply_all(netfilter::TABLE, &netns, &batches))
            .and_then(|r| r)
            .map_err(DataplaneError::from)
    }

    /// Stops delaying at once (the lane passes everything from now on); the rules go in the
    /// background, then the lane, so that no packet is left in a queue nobody reads. With an
    /// `id`, the outcome is kept for `Shaper::cleanup` (a failure for `Shaper::retry`); without
    /// (undoing a placement that did not complete) a failure is only logged.
    pub(super) fn unplace(&mut self, id: Option<&str>, placement: Placement) {
        placement.lane.refresh(0);
        let inode = placement.netns.inode();
        match self.in_use.get_mut(&inode) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                self.in_use.remove(&inode);
            }
        }
        let families = placement.lines.iter().map(|(family, _)| *family).collect();
        self.remove_in_background(id, placement, families);
    }

    /// Queues the removal of what `placement` still holds; the agent's chains go too if no
    /// fault of ours is left in its namespace by then.
    pub(super) fn remove_in_background(
        &mut self,
        id: Option<&str>,
        placement: Placement,
        families: Vec<Family>,
    ) {
        let last = !self.in_use.contains_key(&placement.netns.inode());
        let instance = self.instance.clone();
        let cleanups = self.cleanups.clone();
        let id = id.map(str::to_owned);
        if let Some(id) = &id {
            cleanups.begin(id);
        }
        self.worker.spawn(move || {
            let left = remove_rules(placement, families, last, &instance);
            match &id {
                Some(id) => cleanups.finish(id, left),
                None => drop(left),
            }
        });
    }
}

/// The conntrack mark id of a fault, free among `marks`: only a cgroup's ingress needs one (an
/// interface's has its own hook).
fn free_mark_id(
    fault: &Shaped<'_>,
    matcher: &Matcher,
    marks: &BTreeSet<u8>,
) -> Result<Option<u8>, DataplaneError> {
    let ingress = matches!(fault.target.direction, Direction::Ingress | Direction::Both);
    if !(ingress && matches!(matcher, Matcher::Cgroup(_))) {
        return Ok(None);
    }
    (1..=netfilter::MAX_MARK_ID)
        .find(|id| !marks.contains(id))
        .map(Some)
        .ok_or_else(|| DataplaneError::Exhausted {
            mechanism: Mechanism::Nfqueue.name(),
            reason: format!(
                "all {} connection-mark ids for ingress faults are in use in this network \
                 namespace",
                netfilter::MAX_MARK_ID
            ),
        })
}

/// Applies each family's batch in `netns`; if one fails, takes out what the families before it
/// got.
pub(super) fn apply_all(
    table: &str,
    netns: &NetNs,
    batches: &[(Family, Vec<String>)],
) -> Result<(), NfqueueError> {
    for (applied, (family, lines)) in batches.iter().enumerate() {
        if let Err(e) = netfilter::restore_table(table, *family, Some(netns), lines) {
            for (family, lines) in &batches[..applied] {
                let undo = netfilter::undo(lines);
                if let Err(e) = netfilter::restore_table(table, *family, Some(netns), &undo) {
                    tracing::warn!(error = %e, table, "undoing rules");
                }
            }
            return Err(NfqueueError::Rules {
                family: family.name(),
                source: e,
            });
        }
    }
    Ok(())
}
