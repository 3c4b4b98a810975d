//! The faults in force or ended: list, get one, remove one, and abort them all.

use anyhow::Result;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use faultd_proto::v1::{
    AbortRequest, FaultSelection, GetFaultRequest, ListFaultsRequest, RemoveRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::args::Output;
use crate::error::rpc_error;
use crate::output::json::{duration_json, fault_json, object};
use crate::output::show;
use crate::output::text::{abort_text, fault_detail, fault_table, removed_text};

/// `faultctl list [--ended | --all]`.
pub async fn list(
    faults: &mut FaultServiceClient<Channel>,
    ended: bool,
    all: bool,
    output: Output,
) -> Result<()> {
    let select = match (ended, all) {
        (true, _) => FaultSelection::SelectEnded,
        (_, true) => FaultSelection::SelectAll,
        _ => FaultSelection::SelectActive,
    };
    let list = faults
        .list(ListFaultsRequest {
            select: select.into(),
        })
        .await
        .map_err(rpc_error("listing faults"))?;
    let list = list.into_inner().faults;
    let json = json!({ "faults": list.iter().map(fault_json).collect::<Vec<_>>() });
    show(output, || fault_table(&list), json)
}

/// `faultctl get ID`.
pub async fn get(
    faults: &mut FaultServiceClient<Channel>,
    id: String,
    output: Output,
) -> Result<()> {
    let request = GetFaultRequest { id: id.clone() };
    let fault = faults
        .get(request)
        .await
        .map_err(rpc_error(format!("getting fault {id}")))?;
    let fault = fault.into_inner();
    show(output, || fault_detail(&fault), fault_json(&fault))
}

/// `faultctl rm ID`.
pub async fn remove(
    faults: &mut FaultServiceClient<Channel>,
    id: String,
    output: Output,
) -> Result<()> {
    let request = RemoveRequest { id: id.clone() };
    let fault = faults
        .remove(request)
        .await
        .map_err(rpc_error(format!("removing fault {id}")))?;
    let fault = fault.into_inner();
    show(output, || removed_text(&fault), fault_json(&fault))
}

/// `faultctl abort`.
pub async fn abort(faults: &mut FaultServiceClient<Channel>, output: Output) -> Result<()> {
    let abort = faults
        .abort(AbortRequest {})
        .await
        .map_err(rpc_error("aborting"))?;
    let abort = abort.into_inner();
    let json = object(vec![
        ("revertedFaultIds", json!(abort.reverted_fault_ids)),
        ("revokedLeaseIds", json!(abort.revoked_lease_ids)),
        (
            "stillRevertingFaultIds",
            json!(abort.still_reverting_fault_ids),
        ),
        ("took", duration_json(abort.took.as_ref())),
    ]);
    show(output, || abort_text(&abort), json)
}
