//! What can fail in the dataplane, with the kernel's or aya's error as the source.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use aya::maps::MapError;
use aya::programs::ProgramError;

use super::rtnl::RtnlError;
use super::sock_diag;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "faultd was built without the eBPF toolchain (empty stub object); run `cargo xtask setup` and rebuild"
    )]
    StubObject,
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] LoadError),
    #[error("attaching {program} to {cgroup}: {source}")]
    Attach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching {program} from {cgroup}: {source}")]
    Detach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// The cgroup directory to attach `program` to did not open.
    #[error("attaching {program} to {cgroup}: {source}")]
    OpenCgroup {
        program: &'static str,
        cgroup: String,
        #[source]
        source: io::Error,
    },
    #[error("updating BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// A per-CPU value of `map` could not be built (the number of CPUs did not match).
    #[error("updating BPF map {map}: {source}")]
    PerCpuValues {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("traffic control: {0}")]
    Tc(#[from] TcError),
    /// The mechanism cannot apply this fault here (FAILED_PRECONDITION, like a missing
    /// mechanism), e.g. a cgroup path NFQUEUE cannot express.
    #[error("{mechanism}: {reason}")]
    Unsupported {
        mechanism: &'static str,
        reason: String,
    },
    /// A mechanism ran out of something it hands out (RESOURCE_EXHAUSTED), e.g. the conntrack
    /// mark ids of NFQUEUE ingress faults.
    #[error("{mechanism}: {reason}")]
    Exhausted {
        mechanism: &'static str,
        reason: String,
    },
    /// A shaping mechanism could not apply or revert a fault.
    #[error("{mechanism}: {reason}")]
    Shaper {
        mechanism: &'static str,
        reason: String,
    },
    /// A shaping mechanism could not apply or revert a fault, for the reason in `source`.
    #[error("{mechanism}: {source}")]
    ShaperFailed {
        mechanism: &'static str,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("resetting connections: {0}")]
    SockDiag(#[from] sock_diag::SockDiagError),
}

/// Why the datapath cannot apply an action on this host: what its probes found missing.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Unavailable {
    /// The connect programs (reject, reset) did not load or attach.
    #[error("cgroup/connect programs: {0}")]
    ConnectPrograms(#[source] Arc<DataplaneError>),
    /// This kernel does not let faultd destroy sockets (reset).
    #[error(transparent)]
    SockDestroy(Arc<sock_diag::SockDestroyUnavailable>),
    #[error("delay and bandwidth are applied by a shaping mechanism")]
    Shaping,
    /// The request-match maps or their reset thread are missing.
    #[error("request matching: {0}")]
    Requests(#[source] Arc<DataplaneError>),
    /// What a stand-in datapath (tests) says is missing.
    #[error("{0}")]
    Missing(String),
}

/// What failed while loading the eBPF object, its programs or its maps.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Object(Box<aya::EbpfError>),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    /// The program is not of the type faultd expects.
    #[error(transparent)]
    ProgramType(Box<ProgramError>),
    /// The verifier (or the kernel) refused the program; the message carries its log.
    #[error("{program}: {}", verifier_detail(source))]
    Verify {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{what}: {source}")]
    Cpus {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("starting the liveness thread: {0}")]
    LivenessThread(#[source] io::Error),
}

impl LoadError {
    pub fn object(e: aya::EbpfError) -> Self {
        Self::Object(Box::new(e))
    }

    pub fn program_type(e: ProgramError) -> Self {
        Self::ProgramType(Box::new(e))
    }

    pub fn verify(program: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |e| Self::Verify {
            program,
            source: Box::new(e),
        }
    }

    /// For `aya::util::nr_cpus`, which fails with what it read and why.
    pub fn cpus((what, source): (&'static str, io::Error)) -> Self {
        Self::Cpus { what, source }
    }
}

/// The verifier log is the useful part of a load failure.
fn verifier_detail(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// What failed in traffic control: attaching or detaching tc programs, qdiscs, tags.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    /// A path (a network namespace, the tag lock directory) could not be read or created.
    #[error("{}: {source}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering {}: {source}", netns.display())]
    EnterNetns {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: Box<AttachFailure>,
    },
    #[error("attaching {program} to {interface} egress: {source}")]
    AttachEgress {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching {program}: {source}")]
    Detach {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching {program} from {interface}: {source}")]
    DetachFrom {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("removing the clsact qdisc of {interface}: {source}")]
    RemoveClsact {
        interface: String,
        #[source]
        source: RtnlError,
    },
    #[error("all {count} tc tags in {} are held by running faultd instances", dir.display())]
    TagsHeld { count: u16, dir: PathBuf },
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
}

/// Why the tc programs did not attach to an interface.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailure {
    #[error(transparent)]
    Name(#[from] std::ffi::NulError),
    #[error(transparent)]
    Clsact(#[from] RtnlError),
    #[error(transparent)]
    Program(#[from] ProgramError),
}

/// A map call's error, naming the map.
pub(super) fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        source: Box::new(e),
    }
}
