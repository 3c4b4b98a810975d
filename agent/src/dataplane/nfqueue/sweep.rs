//! What dead agents left: their chains in a namespace, and the namespaces this agent records
//! for its successor on the same state directory to sweep after a crash.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::NfqueueShaper;
use crate::dataplane::netfilter::{self, ExecError, Family, Listing};
use crate::instance::Instance;
use crate::target::namespaces::{self, NetNs};

/// Lists the mangle table of `netns` and removes the chains of every owner `dead` says is
/// gone; returns the listing as it was, and how many owners went.
fn sweep(
    family: Family,
    netns: &NetNs,
    dead: impl Fn(&str) -> bool,
) -> Result<(Listing, usize), ExecError> {
    let listing = netfilter::list(family, Some(netns))?;
    let mut swept = 0;
    for owner in listing.owners() {
        if dead(&owner) {
            netfilter::restore(family, Some(netns), &listing.removal(&owner))?;
            swept += 1;
        }
    }
    Ok((listing, swept))
}

/// The mangle table of `netns` as listed, after which the chains of agents other than
/// `instance` that are gone are removed.
pub(super) fn list_sweeping(
    family: Family,
    netns: &NetNs,
    instance: &str,
) -> Result<Listing, ExecError> {
    sweep(family, netns, |owner| {
        owner != instance && !Instance::is_alive(owner)
    })
    .map(|(listing, _)| listing)
}

impl NfqueueShaper {
    pub(super) fn record_netns(&mut self, inode: u64) {
        if self.recorded.insert(inode) {
            let text: Vec<String> = self.recorded.iter().map(u64::to_string).collect();
            if let Err(e) = fs::write(&self.record, text.join("\n") + "\n") {
                tracing::warn!(error = %e, path = %self.record.display(),
                    "recording a namespace for the next agent's sweep");
            }
        }
    }

    /// Clears the record: nothing of ours is left in any namespace.
    pub(super) fn forget_namespaces(&mut self) {
        self.recorded.clear();
        if let Err(e) = fs::write(&self.record, "") {
            tracing::debug!(error = %e, "clearing the namespace record");
        }
    }
}

/// The namespaces other than `own` that the previous agent on this state directory recorded
/// in `record` and that still exist.
pub(super) fn recorded_namespaces(record: &Path, own: &NetNs) -> Vec<Arc<NetNs>> {
    let previous = fs::read_to_string(record).unwrap_or_default();
    previous
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .filter(|inode| *inode != own.inode())
        .filter_map(namespaces::find)
        .map(Arc::new)
        .collect()
}

/// Removes, in each of `namespaces` and family, the chains of agents that are gone; a chain
/// named after our own id `own_id` can only be a dead namesake's.
pub(super) fn sweep_dead(namespaces: &[Arc<NetNs>], own_id: &str) {
    for netns in namespaces {
        for family in Family::ALL {
            match sweep(family, netns, |owner| {
                owner == own_id || !Instance::is_alive(owner)
            }) {
                Ok((_, 0)) => {}
                Ok((_, n)) => tracing::info!(
                    netns = %netns.path().display(), family = family.name(), agents = n,
                    "removed NFQUEUE rules of agents that are gone"
                ),
                Err(e) => {
                    tracing::warn!(netns = %netns.path().display(), family = family.name(),
                    error = %e, "sweeping NFQUEUE rules of agents that are gone")
                }
            }
            sweep_refusing(family, netns, own_id);
        }
    }
}

/// Removes the filter-table chains (REJECT rules of `reject` on an interface) of agents that
/// are gone, in `netns`.
fn sweep_refusing(family: Family, netns: &NetNs, own_id: &str) {
    let swept =
        netfilter::list_table(netfilter::REFUSE_TABLE, family, Some(netns)).and_then(|listing| {
            let dead: Vec<String> = listing
                .owners()
                .into_iter()
                .filter(|owner| owner == own_id || !Instance::is_alive(owner))
                .collect();
            for owner in &dead {
                let removal = listing.removal(owner);
                netfilter::restore_table(netfilter::REFUSE_TABLE, family, Some(netns), &removal)?;
            }
            Ok(dead.len())
        });
    match swept {
        Ok(0) => {}
        Ok(n) => tracing::info!(netns = %netns.path().display(), family = family.name(),
            agents = n, "removed REJECT rules of agents that are gone"),
        Err(e) => tracing::warn!(netns = %netns.path().display(), family = family.name(),
            error = %e, "sweeping REJECT rules of agents that are gone"),
    }
}
