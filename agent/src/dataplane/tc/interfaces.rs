//! The interfaces faultd shapes: its root qdisc (htb `<tag>:`) and the classifier on each up
//! interface, each fault's class there, and their removal with the last fault.

use std::collections::HashMap;

use aya::programs::tc::{NlOptions, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use faultd_common::PROG_SHAPE;

use super::shaping::{DIRECT_QLEN, Interface, TcShaping, tc_err};
use super::spec::ShapeMechanism;
use super::{edt, netem};
use crate::dataplane::rtnl::{self, CLSACT_HANDLE, TC_H_ROOT};
use crate::dataplane::{DataplaneError, LoadError, TcError, tcx_available};

impl TcShaping {
    /// Installs the root qdisc and classifier on every up interface not covered yet, with the
    /// classes of the faults already in force.
    pub(super) fn cover_interfaces(&mut self) -> Result<(), DataplaneError> {
        let links = self.rtnl.links().map_err(tc_err)?;
        let roots: HashMap<u32, u32> = self
            .rtnl
            .qdiscs()
            .map_err(tc_err)?
            .into_iter()
            .filter(|q| q.parent == TC_H_ROOT)
            .map(|q| (q.ifindex, q.handle))
            .collect();
        for link in links.into_iter().filter(|l| l.up) {
            if self.interfaces.contains_key(&link.index) {
                continue;
            }
            let root = roots.get(&link.index).copied().unwrap_or(0);
            if root >> 16 != 0 && root >> 16 != u32::from(self.tag) {
                tracing::warn!(interface = %link.name, root = %rtnl::handle(root),
                    "not shaping this interface: its root qdisc is someone else's");
                continue;
            }
            self.cover(link.index, &link.name)?;
            let slots: Vec<u32> = self.faults.keys().copied().collect();
            for slot in slots {
                self.install_fault(link.index, slot)?;
            }
        }
        Ok(())
    }

    pub(super) fn cover(&mut self, ifindex: u32, name: &str) -> Result<(), DataplaneError> {
        self.rtnl
            .replace_root_qdisc(
                ifindex,
                self.tag,
                "htb",
                rtnl::htb_root_options(DIRECT_QLEN),
            )
            .map_err(tc_err)?;
        let mut interface = Interface {
            name: name.to_string(),
            link: None,
            added_clsact: false,
            edt_class: false,
        };
        let attached = self.attach(ifindex, name, &mut interface);
        self.interfaces.insert(ifindex, interface);
        attached?;
        tracing::info!(interface = name, "shaping qdisc and classifier installed");
        Ok(())
    }

    /// Attaches the classifier on egress: an fd-owned TCX link where the kernel has TCX, else a
    /// cls_bpf filter with this instance's priority on clsact.
    pub(super) fn attach(
        &mut self,
        ifindex: u32,
        name: &str,
        interface: &mut Interface,
    ) -> Result<(), DataplaneError> {
        let tag = self.tag;
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_SHAPE)
            .ok_or(LoadError::MissingProgram(PROG_SHAPE))?
            .try_into()
            .map_err(LoadError::program_type)?;
        if tcx_available() {
            match program.attach_with_options(
                name,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(link) => {
                    interface.link = Some(link);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(interface = name, error = %e, "TCX attach failed; using clsact");
                }
            }
        }
        interface.added_clsact = self.rtnl.add_clsact(ifindex).map_err(tc_err)?;
        let link = program
            .attach_with_options(
                name,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: tag,
                    handle: TcHandle::new(0, 1),
                    classid: None,
                }),
            )
            .map_err(|source| TcError::AttachEgress {
                program: PROG_SHAPE,
                interface: name.to_string(),
                source: Box::new(source),
            })?;
        interface.link = Some(link);
        Ok(())
    }

    pub(super) fn install_fault(&mut self, ifindex: u32, slot: u32) -> Result<(), DataplaneError> {
        let Some(fault) = self.faults.get(&slot) else {
            return Ok(());
        };
        match fault.mechanism {
            ShapeMechanism::Netem => netem::install(
                &mut self.rtnl,
                ifindex,
                self.tag,
                slot,
                &fault.spec,
                &self.table,
            )
            .map_err(|e| {
                let others = self
                    .faults
                    .iter()
                    .filter(|(other, f)| **other != slot && f.mechanism == ShapeMechanism::Netem)
                    .map(|(_, f)| &f.spec);
                match netem::mix_refused(&e, &fault.spec, others) {
                    Some(reason) => DataplaneError::Unsupported {
                        mechanism: "netem",
                        reason: format!("{reason} (interface {ifindex})"),
                    },
                    None => tc_err(e),
                }
            }),
            ShapeMechanism::Edt => {
                let Some(interface) = self.interfaces.get_mut(&ifindex) else {
                    return Ok(());
                };
                if !interface.edt_class {
                    edt::install(&mut self.rtnl, ifindex, self.tag).map_err(tc_err)?;
                    interface.edt_class = true;
                }
                Ok(())
            }
        }
    }

    /// Detaches the classifier and removes the qdiscs from every interface.
    pub(super) fn release_interfaces(&mut self) -> Result<(), DataplaneError> {
        let mut first_error = None;
        let interfaces = std::mem::take(&mut self.interfaces);
        for (ifindex, interface) in interfaces {
            if let Some(link) = interface.link
                && let Ok(program) = <&mut SchedClassifier>::try_from(
                    self.ebpf
                        .program_mut(PROG_SHAPE)
                        .ok_or(LoadError::MissingProgram(PROG_SHAPE))?,
                )
                && let Err(e) = program.detach(link)
            {
                first_error.get_or_insert(
                    TcError::DetachFrom {
                        program: PROG_SHAPE,
                        interface: interface.name.clone(),
                        source: Box::new(e),
                    }
                    .into(),
                );
            }
            if interface.added_clsact
                && let Err(e) = self.rtnl.delete_qdisc(ifindex, CLSACT_HANDLE, 0xFFFF_FFF1)
            {
                first_error.get_or_insert(tc_err(e));
            }
            if let Err(e) = self
                .rtnl
                .delete_qdisc(ifindex, u32::from(self.tag) << 16, TC_H_ROOT)
            {
                first_error.get_or_insert(tc_err(e));
            }
            tracing::info!(interface = %interface.name, "shaping qdisc and classifier removed");
        }
        first_error.map_or(Ok(()), Err)
    }
}
