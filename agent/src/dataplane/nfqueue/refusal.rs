//! `reject` on a `netns{path, interface}` scope: the interface has no local sockets for the
//! cgroup programs to refuse, so new TCP connects through it are answered with a reset by
//! REJECT rules in that namespace's filter table (`netfilter::refuse`). They go through this
//! mechanism because it already owns what they need: the exec of iptables-restore in a
//! namespace, the agent's id in chain names, and the sweep of a dead agent's chains.

use std::collections::HashMap;
use std::sync::Arc;

use super::placement::{apply_all, backstop_until, swap_lines};
use super::{NfqueueShaper, spawn_swaps};
use crate::dataplane::netfilter::{
    self, Family, REFUSE_TABLE, RefuseRules, list_table, refuse_chain, refuse_chain_creation,
    restore_table,
};
use crate::dataplane::{DataplaneError, Shaped};
use crate::fault::{FaultId, Mechanism, Scope};
use crate::instance::Instance;
use crate::target::namespaces::NetNs;

/// One fault's refusing rules, in force in `netns`.
pub(super) struct Refusal {
    netns: Arc<NetNs>,
    rules: RefuseRules,
    /// The `-A` lines in force per family, for their removal.
    lines: Vec<(Family, Vec<String>)>,
}

/// The faults refusing connects, by id.
pub(super) type Refusals = HashMap<FaultId, Refusal>;

fn exec_error(e: impl ToString) -> DataplaneError {
    super::shaper_error(format!("refusing connects: {}", e.to_string()))
}

impl NfqueueShaper {
    /// Puts the REJECT rules of `fault` in its namespace, all or nothing across families; a
    /// dead agent's chains there are swept first.
    pub(super) fn refuse(
        &mut self,
        fault: &Shaped<'_>,
        families: &[Family],
    ) -> Result<(), DataplaneError> {
        let Scope::Netns { interface, .. } = &fault.target.scope else {
            return Err(exec_error("only an interface in a network namespace"));
        };
        netfilter::check_interface(interface).map_err(|e| DataplaneError::Unsupported {
            mechanism: Mechanism::Nfqueue.name(),
            reason: e.to_string(),
        })?;
        let netns = self.namespaces_of(fault)?.swap_remove(0);
        let rules = RefuseRules {
            instance: self.instance.clone(),
            fault: fault.id.clone(),
            interface: interface.clone(),
            direction: fault.target.direction,
            ports: fault.target.ports.clone(),
            // Slots are unique among the agent's faults: the fault's own chains are too.
            tag: fault.slot as u16,
            until: Some(backstop_until(fault.expires_at_ns)),
            peers: fault.target.peer_set().map_err(exec_error)?,
        };
        // Recorded before anything is in: a crash in between leaves the successor a sweep.
        self.record_netns(netns.inode());
        let (instance, job_netns, job_rules, job_families) = (
            self.instance.clone(),
            netns.clone(),
            rules.clone(),
            families.to_vec(),
        );
        self.worker
            .call(move || refuse_all(&instance, &job_netns, &job_rules, &job_families))
            .map_err(DataplaneError::from)??;
        let lines = families.iter().map(|&f| (f, rules.lines(f))).collect();
        tracing::info!(fault = %fault.id, netns = %netns.path().display(), %interface,
            "REJECT rules in place");
        self.refusals.insert(
            fault.id.clone(),
            Refusal {
                netns,
                rules,
                lines,
            },
        );
        Ok(())
    }

    /// Takes the fault's rules out, and the agent's chains with the last refusing fault of
    /// the namespace, on the worker (after any deadline move still queued: the removal names
    /// the lines that move put in). What fails is left to the next agent's sweep (the rules
    /// end at their datestop anyway).
    pub(super) fn end_refusal(&mut self, id: &str) {
        let Some(refusal) = self.refusals.remove(id) else {
            return;
        };
        let inode = refusal.netns.inode();
        let last = !self.refusals.values().any(|r| r.netns.inode() == inode);
        let (id, instance) = (id.to_string(), self.instance.clone());
        let removed = self.worker.call(move || {
            for (family, lines) in &refusal.lines {
                let mut removal = netfilter::deletion(lines);
                removal.extend(refusal.rules.teardown(*family));
                let done = restore_table(REFUSE_TABLE, *family, Some(&refusal.netns), &removal)
                    .and_then(|()| {
                        if !last {
                            return Ok(());
                        }
                        let listing = list_table(REFUSE_TABLE, *family, Some(&refusal.netns))?;
                        let chains = listing.removal(&instance);
                        restore_table(REFUSE_TABLE, *family, Some(&refusal.netns), &chains)
                    });
                if let Err(e) = done {
                    tracing::warn!(fault = %id, error = %e, "removing REJECT rules");
                }
            }
        });
        if let Err(e) = removed {
            tracing::warn!(error = %e, "removing REJECT rules");
        }
    }

    /// Moves the rules' kernel-side deadline with a renewed lease. Renewals run on the
    /// caller's task: the iptables calls go to the netfilter worker, as NFQUEUE's do.
    pub(super) fn refresh_refusal(&mut self, id: &str, expires_at_ns: u64) {
        let until = backstop_until(expires_at_ns);
        let Some(refusal) = self.refusals.get_mut(id) else {
            return;
        };
        if refusal.rules.until == Some(until) {
            return;
        }
        refusal.rules.until = Some(until);
        let rules = &refusal.rules;
        let swaps = swap_lines(&mut refusal.lines, |family| rules.lines(family));
        spawn_swaps(&self.worker, REFUSE_TABLE, &refusal.netns, swaps, "REJECT");
    }
}

/// Puts `rules` in `netns` for each of `families`, all or nothing (on the worker).
fn refuse_all(
    instance: &str,
    netns: &NetNs,
    rules: &RefuseRules,
    families: &[Family],
) -> Result<(), DataplaneError> {
    let batches = families
        .iter()
        .map(|&family| {
            let batch = refusal_batch(instance, netns, rules, family).map_err(exec_error)?;
            Ok((family, batch))
        })
        .collect::<Result<Vec<_>, DataplaneError>>()?;
    apply_all(REFUSE_TABLE, netns, &batches).map_err(exec_error)
}

/// One family's transaction, once dead agents' chains are swept: creates ours where missing,
/// adds the fault's rules.
fn refusal_batch(
    instance: &str,
    netns: &NetNs,
    rules: &RefuseRules,
    family: Family,
) -> Result<Vec<String>, netfilter::ExecError> {
    let listing = list_table(REFUSE_TABLE, family, Some(netns))?;
    for owner in listing.owners() {
        if owner != instance && !Instance::is_alive(&owner) {
            restore_table(REFUSE_TABLE, family, Some(netns), &listing.removal(&owner))?;
        }
    }
    let missing: Vec<_> = rules
        .hooks()
        .into_iter()
        .filter(|h| !listing.has_chain(&refuse_chain(instance, *h)))
        .collect();
    let mut transaction = refuse_chain_creation(instance, &missing);
    transaction.extend(rules.setup(family));
    transaction.extend(rules.lines(family));
    Ok(transaction)
}
