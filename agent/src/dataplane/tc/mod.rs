//! Delay and bandwidth faults at the tc egress hook: the `faultd_shape` classifier picks the
//! target's packets (cgroup of the socket and its ancestors, protocol, port: O(1) lookups) and
//! hands them to a qdisc faultd installs and owns. Two mechanisms share this room:
//! - `netem` (`netem.rs`): each fault gets an htb class whose netem leaf delays, or whose
//!   rate limits, the packets the classifier steers into it through `skb->priority`;
//! - `edt` (`edt.rs`): the classifier stamps each packet's Earliest Departure Time
//!   (`skb->tstamp`) and steers it into one shared class whose fq leaf holds it until then.
//!
//! Peers: a fault that names peers puts a marker (`SHAPE_PEERS`) on its keys and its
//! prefixes in `FAULTD_SHAPE_PEERS` under each key (an exclusion is an entry that shapes
//! nothing); faults with disjoint peers (the engine checks) share the keys and the marker, as
//! on the drop path.
//!
//! Which interfaces: every interface of faultd's network namespace that is up, loopback
//! included. A socket's packets leave by the interface its route picks, so covering every
//! interface is the only choice that never misses a target's packets (local peers use
//! loopback, remote ones a NIC, containers a veth or bridge) — and unmatched packets only
//! pass the classifier's lookup and htb's direct queue, unshaped. An interface whose root
//! qdisc someone configured (a non-default handle that is not faultd's) is left alone and
//! logged. Interfaces that come up later are covered at the next fault.
//!
//! Ownership: qdiscs and netlink filters are not fd-owned, so each instance claims a tag
//! (`0x7a00 + n`, lock file `/run/faultd/tc/<tag>.lock`, flock held for life): its root qdiscs
//! have the handle `<tag>:` and its netlink filters the priority `<tag>`. At start an instance
//! removes what carries a tag whose lock nobody holds (a dead instance's), and at the end of the
//! last fault and at shutdown its own. On kernels with TCX (≥ 6.6) the classifier is an
//! fd-owned link; on older ones it is a cls_bpf filter on clsact egress, which a killed agent
//! leaves behind: the classifier then stops shaping by itself within a second, because the
//! agent no longer refreshes its liveness deadline (`FAULTD_SHAPE_ALIVE`).
//!
//! Rooms: `spec` (what a shaping fault does; shared by both mechanisms), `shaping` (the maps,
//! the faults and their entries), `interfaces` (root qdiscs and the classifier on each
//! interface), `tags` (which instance owns which qdiscs and filters; the sweep of dead ones),
//! `shaper` (the engine's `Shaper` for each mechanism, the kernel probe), `netem`, `edt`.

mod edt;
mod interfaces;
mod netem;
mod shaper;
mod shaping;
mod spec;
mod tags;

pub use shaper::{ProbeError, TcShaper, probe, tc_shapers};
pub use shaping::TcShaping;
pub use spec::{ShapeMechanism, ShapeSpec};
pub use tags::{TAG_BASE, TAG_COUNT, TAG_LOCK_DIR};
