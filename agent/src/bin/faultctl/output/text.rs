//! Answers as text for people: one-line reports (injected, removed, revoked, aborted, events),
//! aligned `key  value` details and tables padded to their widest cell.

use faultd::api::convert;
use faultd::duration;
use faultd_proto::v1::{
    self as pb, CapabilitiesResponse, Fault, FaultEvent, FaultState, Lease, fault_event,
};

use super::fields::{
    action_text, direction_text, fault_summary, id_list, labels_text, port_list, protocol_text,
    reason_text, remaining_text, request_text, scope_text, state_text, target_summary, yes_no,
};

pub fn injected_text(fault: &Fault) -> String {
    let mut text = format!(
        "injected fault {} ({}) under lease {}",
        fault.id,
        fault_summary(fault),
        fault.lease_id
    );
    if fault.remaining.is_some() {
        text.push_str(&format!(
            ", expires in {}",
            remaining_text(fault.remaining.as_ref())
        ));
    }
    text
}

pub fn dry_run_text(fault: &Fault) -> String {
    let lease = match fault.lease_id.as_str() {
        "" => "a new lease".to_string(),
        id => format!("lease {id}"),
    };
    let resolved = match &fault.resolved {
        Some(r) => format!(
            "cgroup {} (id {}), {} kernel map entries",
            r.cgroup_path, r.cgroup_id, r.rules
        ),
        None => "-".into(),
    };
    let mut text = String::from("dry run: nothing was changed\n");
    text.push_str(&details(&[
        ("would inject", fault_summary(fault)),
        ("under", lease),
        ("resolved", resolved),
        ("mechanism", fault.mechanism.clone()),
        ("would end in", remaining_text(fault.remaining.as_ref())),
    ]));
    if fault.target.as_ref().is_some_and(|t| t.request.is_some()) {
        text.push_str(&details(&[(
            "requests",
            faultd::fault::request::NOT_MATCHED.to_string(),
        )]));
    }
    text
}

/// e.g. `2026-01-01T10:00:00.5Z  reverted  1f2e...  drop 100% tcp egress ports 6379 cgroup /app
/// (expired: lease expired; matched 12, dropped 12)`.
pub fn event_text(event: &FaultEvent) -> String {
    let time = event
        .time
        .as_ref()
        .map_or_else(|| "-".to_string(), |t| t.to_string());
    let fault = event.fault.clone().unwrap_or_default();
    let id = match fault.id.as_str() {
        "" => "-",
        id => id,
    };
    let counters = fault.counters.unwrap_or_default();
    let (kind, detail) = match &event.kind {
        Some(fault_event::Kind::Applied(_)) => (
            "applied",
            format!("lease {}, {}", fault.lease_id, fault.mechanism),
        ),
        Some(fault_event::Kind::Reverted(reverted)) => {
            let reason = reason_text(reverted.reason);
            (
                "reverted",
                format!(
                    "{reason}: {}; matched {}, dropped {}",
                    reverted.detail, counters.matched, counters.dropped
                ),
            )
        }
        Some(fault_event::Kind::Failed(failed)) => ("failed", failed.message.clone()),
        None => ("event", String::new()),
    };
    format!(
        "{time}  {kind:<8}  {id}  {} ({detail})",
        fault_summary(&fault)
    )
}

pub fn removed_text(fault: &Fault) -> String {
    let counters = fault.counters.unwrap_or_default();
    let mut text = format!(
        "removed fault {} ({}); matched {}, dropped {}",
        fault.id,
        fault_summary(fault),
        counters.matched,
        counters.dropped
    );
    if counters.delayed > 0 {
        text.push_str(&format!(", delayed {}", counters.delayed));
    }
    text
}

/// Aligned `key  value` lines.
fn details(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// Columns padded to their widest cell; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| match i == last {
                true => cell.to_string(),
                false => format!("{cell:<width$}", width = widths[i]),
            })
            .collect();
        padded.join("  ") + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

pub fn fault_table(faults: &[Fault]) -> String {
    if faults.is_empty() {
        return "no faults".into();
    }
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|fault| {
            let counters = fault.counters.unwrap_or_default();
            let left = match FaultState::try_from(fault.state) {
                Ok(FaultState::Active) => remaining_text(fault.remaining.as_ref()),
                _ if fault.ended_at.is_some() => {
                    format!("ended: {}", reason_text(fault.end_reason))
                }
                _ => state_text(fault.state),
            };
            vec![
                fault.id.clone(),
                fault.lease_id.clone(),
                action_text(fault.action.as_ref()),
                fault
                    .target
                    .as_ref()
                    .map(target_summary)
                    .unwrap_or_else(|| "-".into()),
                left,
                counters.matched.to_string(),
                counters.dropped.to_string(),
                counters.refused.to_string(),
                counters.reset.to_string(),
                counters.delayed.to_string(),
                fault.mechanism.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "LEASE",
            "ACTION",
            "TARGET",
            "LEFT",
            "MATCHED",
            "DROPPED",
            "REFUSED",
            "RESET",
            "DELAYED",
            "MECHANISM",
        ],
        &rows,
    )
}

pub fn fault_detail(fault: &Fault) -> String {
    let target = fault.target.clone().unwrap_or_default();
    let counters = fault.counters.unwrap_or_default();
    let resolved = match &fault.resolved {
        Some(resolved) => format!(
            "cgroup {} (id {}), {} kernel map entries",
            resolved.cgroup_path, resolved.cgroup_id, resolved.rules
        ),
        None => "-".into(),
    };
    let expires = match (&fault.ended_at, &fault.expires_at) {
        (Some(ended), _) => format!(
            "ended {ended} ({}: {})",
            reason_text(fault.end_reason),
            fault.end_detail
        ),
        (None, Some(at)) => format!("{at} (in {})", remaining_text(fault.remaining.as_ref())),
        (None, None) => "-".into(),
    };
    details(&[
        ("fault", fault.id.clone()),
        ("lease", fault.lease_id.clone()),
        ("state", state_text(fault.state)),
        ("action", action_text(fault.action.as_ref())),
        ("scope", scope_text(target.scope.as_ref())),
        ("ports", port_list(&target.ports)),
        ("protocol", protocol_text(target.protocol)),
        ("direction", direction_text(target.direction)),
        ("labels", labels_text(&fault.labels)),
        ("resolved", resolved),
        ("mechanism", fault.mechanism.clone()),
        ("expires", expires),
        ("matched", counters.matched.to_string()),
        ("dropped", counters.dropped.to_string()),
        ("refused", counters.refused.to_string()),
        ("reset", counters.reset.to_string()),
        ("delayed", counters.delayed.to_string()),
        (
            "requests",
            match &target.request {
                Some(request) => format!(
                    "{}: matched {}, affected {}",
                    request_text(request),
                    counters.requests_matched,
                    counters.requests_affected
                ),
                None => "-".into(),
            },
        ),
    ])
}

pub fn abort_text(abort: &pb::AbortResponse) -> String {
    // Not rounded like remaining times: an abort usually takes well under a millisecond.
    let took = abort.took.as_ref().and_then(convert::duration_from_proto);
    let mut text = format!(
        "aborted in {}: reverted faults: {}; revoked leases: {}",
        took.map_or("-".into(), duration::format),
        id_list(&abort.reverted_fault_ids),
        id_list(&abort.revoked_lease_ids)
    );
    if !abort.still_reverting_fault_ids.is_empty() {
        text.push_str(&format!(
            "; still being taken out of the kernel (faultctl get shows each): {}",
            id_list(&abort.still_reverting_fault_ids)
        ));
    }
    text
}

pub fn caps_text(caps: &CapabilitiesResponse) -> String {
    let mut text = details(&[
        ("kernel", caps.kernel_release.clone()),
        ("cgroup root", caps.cgroup_root.clone()),
        ("agent", caps.agent_version.clone()),
    ]);
    let capabilities: Vec<Vec<String>> = caps
        .capabilities
        .iter()
        .map(|cap| vec![cap.name.clone(), yes_no(cap.available), cap.detail.clone()])
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["CAPABILITY", "AVAILABLE", "DETAIL"],
        &capabilities,
    ));
    let actions: Vec<Vec<String>> = caps
        .actions
        .iter()
        .map(|action| {
            let available = yes_no(action.available);
            vec![
                action.action.clone(),
                available,
                action.mechanism.clone(),
                action.detail.clone(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["ACTION", "AVAILABLE", "MECHANISM", "DETAIL"],
        &actions,
    ));
    text
}

pub fn lease_detail(lease: &Lease) -> String {
    details(&[
        ("lease", lease.id.clone()),
        ("ttl", remaining_text(lease.ttl.as_ref())),
        ("remaining", remaining_text(lease.remaining.as_ref())),
        (
            "expires",
            lease
                .expires_at
                .map(|at| at.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("private", yes_no(lease.private)),
        ("labels", labels_text(&lease.labels)),
        ("faults", id_list(&lease.fault_ids)),
    ])
}

pub fn revoked_text(id: &str, reverted: &[String]) -> String {
    format!("revoked lease {id}; reverted faults: {}", id_list(reverted))
}

pub fn lease_table(leases: &[Lease]) -> String {
    if leases.is_empty() {
        return "no leases".into();
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|lease| {
            vec![
                lease.id.clone(),
                remaining_text(lease.ttl.as_ref()),
                remaining_text(lease.remaining.as_ref()),
                yes_no(lease.private),
                labels_text(&lease.labels),
                id_list(&lease.fault_ids),
            ]
        })
        .collect();
    table(&["ID", "TTL", "LEFT", "PRIVATE", "LABELS", "FAULTS"], &rows)
}
