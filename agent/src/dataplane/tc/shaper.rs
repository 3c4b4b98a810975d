//! The engine's `Shaper` for each tc mechanism (netem, EDT) over the shared state, which
//! mechanisms this kernel can run (a probe in a private namespace), and how faultd builds them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use faultd_common::{Counters, RuleKey};

use super::shaping::{DIRECT_QLEN, TcShaping};
use super::spec::{ShapeMechanism, ShapeSpec, Tamper};
use super::tags::TAG_BASE;
use super::{edt, netem};
use crate::dataplane::rtnl::{self, Rtnl, RtnlError};
use crate::dataplane::{DataplaneError, Shaped, Shaper, tcx_available};
use crate::fault::{Action, Direction, Mechanism, Scope, Target};

/// The engine's view of one mechanism (netem or EDT) over the shared tc state: both use the
/// same classifier, maps and root qdiscs.
pub struct TcShaper {
    mechanism: ShapeMechanism,
    tc: Arc<std::sync::Mutex<TcShaping>>,
    slots: HashMap<String, u32>,
}

impl TcShaper {
    /// The netem and EDT shapers over one `TcShaping`.
    pub fn pair(tc: TcShaping) -> (TcShaper, TcShaper) {
        let tc = Arc::new(std::sync::Mutex::new(tc));
        let make = |mechanism| TcShaper {
            mechanism,
            tc: tc.clone(),
            slots: HashMap::new(),
        };
        (make(ShapeMechanism::Netem), make(ShapeMechanism::Edt))
    }

    fn tc(&self) -> std::sync::MutexGuard<'_, TcShaping> {
        // Every step rolls back before returning, so a panic cannot leave the state half-done.
        self.tc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: DataplaneError) -> DataplaneError {
        // What the mechanism cannot do here stays FAILED_PRECONDITION (e.g. the netem mix).
        if let DataplaneError::Unsupported { .. } = e {
            return e;
        }
        DataplaneError::ShaperFailed {
            mechanism: self.mechanism.name(),
            source: Box::new(e),
        }
    }
}

/// What a delay, bandwidth, duplicate, corrupt or reorder action asks of the tc mechanisms.
fn spec_of(action: &Action) -> Option<ShapeSpec> {
    let tampering = |latency, tamper| ShapeSpec {
        latency,
        jitter: Duration::ZERO,
        correlation: 0.0,
        rate_bytes_per_sec: 0,
        burst_bytes: 0,
        tamper,
    };
    match action {
        Action::Delay(delay) => Some(ShapeSpec {
            latency: delay.latency,
            jitter: delay.jitter,
            correlation: delay.correlation,
            rate_bytes_per_sec: 0,
            burst_bytes: 0,
            tamper: Tamper::default(),
        }),
        Action::Bandwidth(bandwidth) => Some(ShapeSpec {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            correlation: 0.0,
            rate_bytes_per_sec: bandwidth.rate_bytes_per_sec,
            burst_bytes: u32::try_from(bandwidth.burst).unwrap_or(u32::MAX),
            tamper: Tamper::default(),
        }),
        &Action::Duplicate { percent, .. } => Some(tampering(
            Duration::ZERO,
            Tamper {
                duplicate: percent,
                ..Tamper::default()
            },
        )),
        &Action::Corrupt { percent, .. } => Some(tampering(
            Duration::ZERO,
            Tamper {
                corrupt: percent,
                ..Tamper::default()
            },
        )),
        // netem delays what it does not reorder: the gap is its latency.
        &Action::Reorder { percent, gap, .. } => Some(tampering(
            gap,
            Tamper {
                reorder: Some(percent),
                ..Tamper::default()
            },
        )),
        _ => None,
    }
}

impl Shaper for TcShaper {
    fn mechanism(&self) -> Mechanism {
        match self.mechanism {
            ShapeMechanism::Netem => Mechanism::Netem,
            ShapeMechanism::Edt => Mechanism::Edt,
        }
    }

    fn unavailable(&self, action: &Action) -> Option<String> {
        let Some(spec) = spec_of(action) else {
            // slow_connect, slow_close, slice: the classifier does not look at TCP flags.
            return Some(format!(
                "{} does not apply {}",
                self.mechanism.name(),
                action.name()
            ));
        };
        match self.mechanism {
            // Departure times can delay a packet, not copy, damage or reorder it.
            ShapeMechanism::Edt if !spec.tamper.is_none() => {
                Some(format!("edt does not apply {}", action.name()))
            }
            ShapeMechanism::Edt => edt::check(&spec).err().map(|e| e.to_string()),
            ShapeMechanism::Netem => None,
        }
    }

    fn unavailable_for(&self, action: &Action, target: &Target) -> Option<String> {
        if let Scope::Netns { .. } = target.scope {
            return Some(format!(
                "{} shapes the host's interfaces, not one inside another network namespace \
                 (fault.target.netns); the nfqueue mechanism does",
                self.mechanism.name()
            ));
        }
        if target.direction != Direction::Egress {
            return Some(format!(
                "{} shapes what the workload sends (direction egress) at the interfaces' egress; \
                 {} traffic needs the nfqueue mechanism",
                self.mechanism.name(),
                target.direction.name()
            ));
        }
        self.unavailable(action)
    }

    fn apply(&mut self, fault: &Shaped<'_>) -> Result<(), DataplaneError> {
        let spec = spec_of(fault.action).ok_or_else(|| {
            self.error(DataplaneError::Unsupported {
                mechanism: self.mechanism.name(),
                reason: format!("cannot apply a {} action", fault.action.name()),
            })
        })?;
        // Egress keys only: the classifier runs at the egress hook.
        let keys: Vec<RuleKey> = fault
            .keys
            .iter()
            .filter(|k| k.direction == faultd_common::DIR_EGRESS)
            .copied()
            .collect();
        let mechanism = self.mechanism;
        let peers = fault.target.peer_set().map_err(|e| {
            self.error(DataplaneError::Unsupported {
                mechanism: mechanism.name(),
                reason: e.to_string(),
            })
        })?;
        self.tc()
            .apply(
                fault.slot,
                mechanism,
                spec,
                &keys,
                peers,
                fault.expires_at_ns,
            )
            .map_err(|e| self.error(e))?;
        self.slots.insert(fault.id.clone(), fault.slot);
        Ok(())
    }

    fn refresh(&mut self, id: &str, expires_at_ns: u64) -> Result<(), DataplaneError> {
        let Some(&slot) = self.slots.get(id) else {
            return Ok(());
        };
        self.tc()
            .refresh(slot, expires_at_ns)
            .map_err(|e| self.error(e))
    }

    fn remove(&mut self, id: &str) -> Result<(), DataplaneError> {
        let Some(slot) = self.slots.remove(id) else {
            return Ok(());
        };
        self.tc().remove(slot).map_err(|e| self.error(e))
    }

    fn counters(&self, id: &str) -> Result<Counters, DataplaneError> {
        match self.slots.get(id) {
            Some(&slot) => self.tc().counters(slot).map_err(|e| self.error(e)),
            None => Ok(Counters::default()),
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.tc().shutdown() {
            tracing::error!(mechanism = self.mechanism.name(), error = %e, "removing tc shaping state");
        }
    }
}

/// Why the kernel cannot run a tc shaping mechanism, as `probe` found.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("creating a private network namespace: {0}")]
    Namespace(#[source] std::io::Error),
    /// The kernel refused a qdisc kind it does not have.
    #[error("the kernel has no sch_{kind} ({source})")]
    NoQdisc {
        kind: &'static str,
        #[source]
        source: RtnlError,
    },
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
    #[error("starting the probe thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the probe thread panicked")]
    Panicked,
}

/// Whether this kernel can run `mechanism`, found by building what it needs — an htb root, a
/// class and its netem or fq leaf — on the loopback device of a private network namespace
/// that a short-lived thread creates and takes with it. Names what is missing.
pub fn probe(mechanism: ShapeMechanism) -> Result<(), ProbeError> {
    let thread = std::thread::Builder::new()
        .name("faultd-probe-tc".into())
        .spawn(move || -> Result<(), ProbeError> {
            // SAFETY: unshare on this thread only (network namespaces are per thread).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(ProbeError::Namespace(std::io::Error::last_os_error()));
            }
            let mut rtnl = Rtnl::open()?;
            let missing = |kind: &'static str| {
                move |source: RtnlError| match source.errno() {
                    Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => {
                        ProbeError::NoQdisc { kind, source }
                    }
                    _ => ProbeError::Rtnl(source),
                }
            };
            let lo = 1;
            rtnl.replace_root_qdisc(lo, TAG_BASE, "htb", rtnl::htb_root_options(DIRECT_QLEN))
                .map_err(missing("htb"))?;
            let spec = ShapeSpec {
                latency: Duration::from_millis(1),
                jitter: Duration::ZERO,
                correlation: 0.0,
                rate_bytes_per_sec: 0,
                burst_bytes: 0,
                tamper: Tamper::default(),
            };
            match mechanism {
                ShapeMechanism::Netem => {
                    netem::install(&mut rtnl, lo, TAG_BASE, 0, &spec, &[]).map_err(missing("netem"))
                }
                ShapeMechanism::Edt => edt::install(&mut rtnl, lo, TAG_BASE).map_err(missing("fq")),
            }
        })
        .map_err(ProbeError::Thread)?;
    thread.join().map_err(|_| ProbeError::Panicked)?
}

/// A capability as probed: its name, and what was found or why it is missing.
pub type Found = (&'static str, Result<String, String>);

/// The netem and EDT shapers for the engine, in that order: the real ones where `probe` finds
/// what they need and the classifier loads, else stand-ins that name what is missing. Also
/// what was found, as (capability, Ok(detail) or Err(why)) for `Capabilities`. Blocking.
pub fn tc_shapers(object: &[u8]) -> (Vec<Box<dyn Shaper>>, Vec<Found>) {
    // The report and the stand-in shapers keep what is missing as text.
    let netem = probe(ShapeMechanism::Netem).map_err(|e| e.to_string());
    let edt = probe(ShapeMechanism::Edt).map_err(|e| e.to_string());
    let mut found = vec![
        (
            "netem",
            netem
                .clone()
                .map(|()| "built htb + netem on a private loopback device".to_string()),
        ),
        (
            "fq",
            edt.clone().map(|()| {
                "built htb + fq (with a horizon) on a private loopback device".to_string()
            }),
        ),
    ];
    let loaded = if netem.is_ok() || edt.is_ok() {
        TcShaping::load(object).map_err(|e| format!("loading the tc classifier: {e}"))
    } else {
        Err("no qdisc to shape with".to_string())
    };
    found.push((
        "tc_classifier",
        match &loaded {
            Ok(_) if tcx_available() => {
                Ok("faultd_shape on egress through fd-owned TCX links".into())
            }
            Ok(_) => Ok("faultd_shape on clsact egress through netlink (no TCX before 6.6)".into()),
            Err(e) => Err(e.clone()),
        },
    ));
    let missing = |mechanism: Mechanism, reason: String| -> Box<dyn Shaper> {
        Box::new(crate::dataplane::MissingShaper { mechanism, reason })
    };
    let shapers = match loaded {
        Ok(tc) => {
            let (netem_shaper, edt_shaper) = TcShaper::pair(tc);
            vec![
                match netem {
                    Ok(()) => Box::new(netem_shaper) as Box<dyn Shaper>,
                    Err(why) => missing(Mechanism::Netem, why),
                },
                match edt {
                    Ok(()) => Box::new(edt_shaper) as Box<dyn Shaper>,
                    Err(why) => missing(Mechanism::Edt, why),
                },
            ]
        }
        Err(why) => vec![
            missing(Mechanism::Netem, netem.err().unwrap_or_else(|| why.clone())),
            missing(Mechanism::Edt, edt.err().unwrap_or(why)),
        ],
    };
    (shapers, found)
}
