//! Where the cgroup programs (packets: egress, ingress; connects: connect4, connect6) are
//! attached: at each cgroup holding faults that no other cgroup holding faults contains, as
//! `Coverage` says, through fd-owned bpf_links that die with faultd.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use aya::Ebpf;
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use faultd_common::{PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS, PROG_INGRESS};

use super::coverage::Coverage;
use super::{DataplaneError, LoadError};
use crate::target::ResolvedScope;

/// The cgroups that hold faults, and the programs' links at those that need them.
#[derive(Default)]
pub(super) struct CgroupAttachments {
    coverage: Coverage,
    links: HashMap<u64, CgroupLinks>,
}

impl CgroupAttachments {
    /// One more fault on the cgroup of `scope`; all or nothing. `connect`: whether the
    /// connect programs loaded (and go along).
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        scope: &ResolvedScope,
        connect: bool,
    ) -> Result<(), DataplaneError> {
        self.coverage.add(scope.cgroup_id, &scope.dir);
        let attached = self.reconcile(ebpf, connect);
        if attached.is_err() {
            self.coverage.remove(scope.cgroup_id);
            if let Err(e) = self.reconcile(ebpf, connect) {
                tracing::warn!(error = %e, "undoing a failed cgroup attach");
            }
        }
        attached
    }

    /// One fault less on the cgroup `scope_id`.
    pub fn release(
        &mut self,
        ebpf: &mut Ebpf,
        scope_id: u64,
        connect: bool,
    ) -> Result<(), DataplaneError> {
        self.coverage.remove(scope_id);
        self.reconcile(ebpf, connect)
    }

    /// Attaches and detaches so that the programs sit exactly where `coverage` wants them: new
    /// attachments first, so no faulted cgroup is ever uncovered, then the ones no longer
    /// wanted (none if an attach failed: a surplus attachment costs time, a missing one would
    /// lose a fault).
    fn reconcile(&mut self, ebpf: &mut Ebpf, connect: bool) -> Result<(), DataplaneError> {
        let wanted: HashMap<u64, std::path::PathBuf> = self
            .coverage
            .wanted()
            .into_iter()
            .map(|(id, dir)| (id, dir.to_path_buf()))
            .collect();
        let mut first_error = None;
        for (id, dir) in &wanted {
            if self.links.contains_key(id) {
                continue;
            }
            match attach_cgroup(ebpf, dir, connect) {
                Ok(links) => {
                    tracing::debug!(cgroup = %dir.display(), "cgroup programs attached");
                    self.links.insert(*id, links);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let surplus: Vec<u64> = self
            .links
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in surplus {
            if let Some(links) = self.links.remove(&id)
                && let Err(e) = detach_cgroup(ebpf, links)
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (PROG_EGRESS, CgroupSkbAttachType::Egress),
    (PROG_INGRESS, CgroupSkbAttachType::Ingress),
];
const CONNECT_PROGRAMS: [&str; 2] = [PROG_CONNECT4, PROG_CONNECT6];

fn skb_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSkb, DataplaneError> {
    Ok(ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(LoadError::program_type)?)
}

fn connect_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DataplaneError> {
    Ok(ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(LoadError::program_type)?)
}

/// Loads the egress and ingress packet programs.
pub(super) fn load_skb(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for (name, _) in SKB_PROGRAMS {
        skb_program(ebpf, name)?
            .load()
            .map_err(LoadError::verify(name))?;
    }
    Ok(())
}

/// Loads the connect4/connect6 programs.
pub(super) fn load_connect(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for name in CONNECT_PROGRAMS {
        connect_program(ebpf, name)?
            .load()
            .map_err(LoadError::verify(name))?;
    }
    Ok(())
}

/// The programs' links at one cgroup.
struct CgroupLinks {
    dir: std::path::PathBuf,
    skb: Vec<(&'static str, CgroupSkbLinkId)>,
    connect: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

/// Attaches the packet programs (and the connect programs, if they loaded) at the cgroup
/// `dir`, all or none.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    dir: &Path,
    connect: bool,
) -> Result<CgroupLinks, DataplaneError> {
    let cgroup = dir.display().to_string();
    let file = File::open(dir).map_err(|source| DataplaneError::OpenCgroup {
        program: PROG_EGRESS,
        cgroup: cgroup.clone(),
        source,
    })?;
    let failed = |program: &'static str| {
        let cgroup = cgroup.clone();
        move |source: aya::programs::ProgramError| DataplaneError::Attach {
            program,
            cgroup,
            source: Box::new(source),
        }
    };
    let mut links = CgroupLinks {
        dir: dir.to_path_buf(),
        skb: Vec::new(),
        connect: Vec::new(),
    };
    let mut attached = Ok(());
    for (name, attach_type) in SKB_PROGRAMS {
        // Links stack regardless of the mode (TOOLCHAIN.md: AllowMultiple is EINVAL here).
        match skb_program(ebpf, name).and_then(|p| {
            p.attach(&file, attach_type, CgroupAttachMode::Single)
                .map_err(failed(name))
        }) {
            Ok(link) => links.skb.push((name, link)),
            Err(e) => {
                attached = Err(e);
                break;
            }
        }
    }
    if attached.is_ok() && connect {
        for name in CONNECT_PROGRAMS {
            match connect_program(ebpf, name).and_then(|p| {
                p.attach(&file, CgroupAttachMode::Single)
                    .map_err(failed(name))
            }) {
                Ok(link) => links.connect.push((name, link)),
                Err(e) => {
                    attached = Err(e);
                    break;
                }
            }
        }
    }
    match attached {
        Ok(()) => Ok(links),
        Err(e) => {
            if let Err(undo) = detach_cgroup(ebpf, links) {
                tracing::warn!(error = %undo, "undoing a failed cgroup attach");
            }
            Err(e)
        }
    }
}

/// Detaches the programs' links at one cgroup; keeps going on error and reports the first.
fn detach_cgroup(ebpf: &mut Ebpf, links: CgroupLinks) -> Result<(), DataplaneError> {
    let cgroup = links.dir.display().to_string();
    let detached = |program: &'static str| {
        let cgroup = cgroup.clone();
        move |source: aya::programs::ProgramError| DataplaneError::Detach {
            program,
            cgroup,
            source: Box::new(source),
        }
    };
    let mut first_error = None;
    for (name, link) in links.skb {
        if let Err(e) = skb_program(ebpf, name).and_then(|p| p.detach(link).map_err(detached(name)))
        {
            first_error.get_or_insert(e);
        }
    }
    for (name, link) in links.connect {
        if let Err(e) =
            connect_program(ebpf, name).and_then(|p| p.detach(link).map_err(detached(name)))
        {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
