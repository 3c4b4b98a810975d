//! Prometheus metrics. The engine and the API count into `Metrics` as things happen; what is in
//! force now (active faults, leases, per-fault packet counters from the per-CPU BPF maps) is read
//! from the engine at scrape time, so a scrape never shows a fault that is gone.
//!
//! What faults did also outlives them: `faultd_packets_matched_total` and
//! `faultd_packets_affected_total` add up every fault this agent ran, ended ones included, by
//! action, mechanism, scope kind and effect — closed sets, so their series are few. The per-fault
//! series (`faultd_fault_packets_*`, labelled by fault and lease id) exist only while the fault
//! is in force, so their number is bounded by the policy's `max_active_faults`. Faults with a
//! request match add `faultd_fault_requests_{matched,affected}_total` and, over every fault,
//! `faultd_requests_{matched,affected}_total`.
//!
//! Labels are the domain's names (`action="drop"`, `reason="expired"`), so actions and effects
//! added later need no change here beyond `effects`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::fault::view::{FaultView, RevertReason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevertLabels {
    pub action: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub grpc_service: String,
    pub grpc_method: String,
    pub grpc_code: String,
}

fn latency_histogram() -> Histogram {
    // 10 µs to ~2.6 s: a map update takes microseconds, a slow netlink call milliseconds.
    Histogram::new(exponential_buckets(1e-5, 4.0, 10))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// What faultd counts as it goes. Clones share the same counters.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub faults_applied: Family<ActionLabels, Counter>,
    pub faults_reverted: Family<RevertLabels, Counter>,
    pub lease_expirations: Counter,
    /// Renewals answered while the engine was busy, applied to the kernel right after.
    pub renewals_deferred: Counter,
    pub aborts: Counter,
    pub apply_seconds: HistogramFamily<ActionLabels>,
    pub revert_seconds: HistogramFamily<ActionLabels>,
    pub grpc_handled: Family<GrpcLabels, Counter>,
    pub audit_write_errors: Counter,
    /// Attempts to take a fault out of the kernel that failed (each is tried again).
    pub revert_failures: Counter,
    /// Faults whose revert fails now, retried until it succeeds.
    pub reverts_failing: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            faults_applied: Family::default(),
            faults_reverted: Family::default(),
            lease_expirations: Counter::default(),
            renewals_deferred: Counter::default(),
            aborts: Counter::default(),
            apply_seconds: Family::new_with_constructor(latency_histogram),
            revert_seconds: Family::new_with_constructor(latency_histogram),
            grpc_handled: Family::default(),
            audit_write_errors: Counter::default(),
            revert_failures: Counter::default(),
            reverts_failing: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn applied(&self, action: &str, took: Duration) {
        let labels = ActionLabels {
            action: action.to_string(),
        };
        self.faults_applied.get_or_create(&labels).inc();
        self.apply_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn reverted(&self, action: &str, reason: RevertReason, took: Duration) {
        self.faults_reverted
            .get_or_create(&RevertLabels {
                action: action.to_string(),
                reason: reason.name().to_string(),
            })
            .inc();
        self.revert_seconds
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// One answered gRPC call; `code` as grpc-go names it (OK, INVALID_ARGUMENT, ...).
    pub fn handled(&self, service: &str, method: &str, code: &str) {
        self.grpc_handled
            .get_or_create(&GrpcLabels {
                grpc_service: service.to_string(),
                grpc_method: method.to_string(),
                grpc_code: code.to_string(),
            })
            .inc();
    }

    /// A registry with these counters and what the engine holds at scrape time, all under the
    /// `faultd_` prefix.
    pub fn registry(&self, source: Arc<dyn Source>) -> Registry {
        let mut registry = Registry::with_prefix("faultd");
        registry.register(
            "faults_applied",
            "Faults applied, by action",
            self.faults_applied.clone(),
        );
        registry.register(
            "faults_reverted",
            "Faults reverted, by action and reason (expired, removed, revoked, aborted, shutdown, target_gone)",
            self.faults_reverted.clone(),
        );
        registry.register(
            "lease_expirations",
            "Leases that expired because nobody renewed them",
            self.lease_expirations.clone(),
        );
        registry.register(
            "lease_renewals_deferred",
            "Lease renewals answered while faultd was busy with other faults' kernel or iptables \
             work, recorded and applied right after (they never wait)",
            self.renewals_deferred.clone(),
        );
        registry.register(
            "aborts",
            "FaultService.Abort calls (emergency stops)",
            self.aborts.clone(),
        );
        registry.register_with_unit(
            "fault_apply",
            "Time to validate, resolve and apply a fault in the kernel",
            Unit::Seconds,
            self.apply_seconds.clone(),
        );
        registry.register_with_unit(
            "fault_revert",
            "Time to take a fault out of the kernel",
            Unit::Seconds,
            self.revert_seconds.clone(),
        );
        registry.register(
            "grpc_handled",
            "gRPC calls answered, by service, method and status code",
            self.grpc_handled.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Audit log lines that could not be written",
            self.audit_write_errors.clone(),
        );
        registry.register(
            "revert_failures",
            "Attempts to take a fault out of the kernel that failed (each is tried again)",
            self.revert_failures.clone(),
        );
        registry.register(
            "reverts_failing",
            "Faults whose revert is failing now (state REVERT_FAILING), retried until it succeeds",
            self.reverts_failing.clone(),
        );
        registry.register_collector(Box::new(SourceCollector {
            source: Arc::downgrade(&source),
        }));
        registry
    }
}

/// What the totals are broken down by: all from closed sets, so the number of series is bounded
/// whatever the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TotalKey {
    pub action: &'static str,
    pub mechanism: &'static str,
    pub scope: &'static str,
}

/// Packets matched, and what the faults did, by effect, over every fault of this agent; and
/// the requests that faults with a request match matched and affected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub matched: BTreeMap<TotalKey, u64>,
    pub affected: BTreeMap<(TotalKey, &'static str), u64>,
    /// (requests matched, requests affected), for faults with a request match only.
    pub requests: BTreeMap<TotalKey, (u64, u64)>,
}

impl Totals {
    /// Adds what `fault` did (so far, or in all, if it ended).
    pub fn add(&mut self, fault: &FaultView) {
        let key = TotalKey {
            action: fault.spec.action.name(),
            mechanism: fault.mechanism,
            scope: fault.spec.target.scope.kind(),
        };
        *self.matched.entry(key).or_default() += fault.counters.matched;
        for (effect, value) in fault.effects() {
            *self.affected.entry((key, effect)).or_default() += value;
        }
        if fault.spec.target.request.is_some() {
            let requests = self.requests.entry(key).or_default();
            requests.0 += fault.counters.requests_matched;
            requests.1 += fault.counters.requests_affected;
        }
    }
}

/// What the metrics read at one instant.
pub struct Snapshot {
    /// The faults in force, with their counters.
    pub faults: Vec<FaultView>,
    pub leases: usize,
    /// Every fault this agent ran, ended and live.
    pub totals: Totals,
}

/// Where the scrape-time metrics come from (the engine).
pub trait Source: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

/// Renders the registry in the text exposition format (OpenMetrics, which Prometheus reads).
/// Blocking: it reads the BPF counters of every fault.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// The content type of `render`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads the source (the engine) at scrape time.
struct SourceCollector {
    source: Weak<dyn Source>,
}

impl std::fmt::Debug for SourceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ActiveLabels {
    action: String,
    mechanism: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct FaultLabels {
    fault: String,
    lease: String,
    action: &'static str,
    mechanism: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct EffectLabels {
    #[prometheus(flatten)]
    fault: FaultLabels,
    effect: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct TotalLabels {
    action: &'static str,
    mechanism: &'static str,
    scope: &'static str,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct TotalEffectLabels {
    #[prometheus(flatten)]
    total: TotalLabels,
    effect: &'static str,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.upgrade() else {
            return Ok(());
        };
        let Snapshot {
            faults,
            leases,
            totals,
        } = source.snapshot();

        let mut active: BTreeMap<ActiveLabels, u64> = BTreeMap::new();
        for fault in &faults {
            *active
                .entry(ActiveLabels {
                    action: fault.spec.action.name().to_string(),
                    mechanism: fault.mechanism.to_string(),
                })
                .or_default() += 1;
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "faults_active",
            "Faults in force, by action and mechanism",
            None,
            gauge.metric_type(),
        )?;
        for (labels, count) in &active {
            ConstGauge::new(*count as i64).encode(family.encode_family(labels)?)?;
        }
        let gauge = ConstGauge::new(leases as i64);
        let metric = encoder.encode_descriptor(
            "leases_active",
            "Leases held (private ones included)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;

        counters(
            &mut encoder,
            "fault_packets_matched",
            "Packets that matched a fault's target, per fault (per-CPU BPF counters, summed)",
            faults.iter().map(|f| (fault_labels(f), f.counters.matched)),
        )?;
        counters(
            &mut encoder,
            "fault_packets_affected",
            "What a fault did, per fault and effect: packets dropped, connects refused, \
             packets delayed, connections reset, packets duplicated, corrupted, reordered, \
             TCP segments sliced",
            faults.iter().flat_map(|f| {
                f.effects().into_iter().map(move |(effect, value)| {
                    let fault = fault_labels(f);
                    (EffectLabels { fault, effect }, value)
                })
            }),
        )?;
        // Request matches (Redis commands, PostgreSQL statements): faults that have one.
        let with_request = || faults.iter().filter(|f| f.spec.target.request.is_some());
        counters(
            &mut encoder,
            "fault_requests_matched",
            "Requests (Redis commands, PostgreSQL statements) that matched a fault's request \
             match, per fault, retransmissions included",
            with_request().map(|f| (fault_labels(f), f.counters.requests_matched)),
        )?;
        counters(
            &mut encoder,
            "fault_requests_affected",
            "Matched requests that a fault acted on (dropped, delayed, reset, reply lost), per \
             fault",
            with_request().map(|f| (fault_labels(f), f.counters.requests_affected)),
        )?;
        // Over every fault this agent ran, ended ones included: never goes backwards.
        counters(
            &mut encoder,
            "packets_matched",
            "Packets that matched a fault's target, over every fault of this agent (ended ones \
             included), by action, mechanism and scope kind",
            totals
                .matched
                .iter()
                .map(|(key, value)| (total_labels(key), *value)),
        )?;
        counters(
            &mut encoder,
            "packets_affected",
            "What faults did, over every fault of this agent (ended ones included), by action, \
             mechanism, scope kind and effect: packets dropped, connects refused, packets \
             delayed, connections reset, packets duplicated, corrupted, reordered, TCP segments \
             sliced",
            totals.affected.iter().map(|((key, effect), value)| {
                let total = total_labels(key);
                (TotalEffectLabels { total, effect }, *value)
            }),
        )?;
        counters(
            &mut encoder,
            "requests_matched",
            "Requests that matched a fault's request match, over every fault of this agent \
             (ended ones included), by action, mechanism and scope kind",
            totals
                .requests
                .iter()
                .map(|(key, (matched, _))| (total_labels(key), *matched)),
        )?;
        counters(
            &mut encoder,
            "requests_affected",
            "Matched requests that faults acted on, over every fault of this agent (ended ones \
             included), by action, mechanism and scope kind",
            totals
                .requests
                .iter()
                .map(|(key, (_, affected))| (total_labels(key), *affected)),
        )
    }
}

/// One counter family: a sample for each (labels, value).
fn counters<L: EncodeLabelSet + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn fault_labels(fault: &FaultView) -> FaultLabels {
    FaultLabels {
        fault: fault.id.clone(),
        lease: fault.lease_id.clone(),
        action: fault.spec.action.name(),
        mechanism: fault.mechanism,
    }
}

fn total_labels(key: &TotalKey) -> TotalLabels {
    TotalLabels {
        action: key.action,
        mechanism: key.mechanism,
        scope: key.scope,
    }
}
