//! What faultd says about itself: what the kernel offers (`caps`) and whether it serves
//! (`health`, for liveness and readiness probes).

use anyhow::{Result, bail};
use faultd_proto::v1::CapabilitiesRequest;
use faultd_proto::v1::fault_service_client::FaultServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::args::Output;
use crate::error::rpc_error;
use crate::output::json::caps_json;
use crate::output::show;
use crate::output::text::caps_text;

/// `faultctl caps`.
pub async fn caps(faults: &mut FaultServiceClient<Channel>, output: Output) -> Result<()> {
    let caps = faults.capabilities(CapabilitiesRequest {}).await;
    let caps = caps
        .map_err(rpc_error("reading capabilities"))?
        .into_inner();
    show(output, || caps_text(&caps), caps_json(&caps))
}

/// `grpc.health.v1.Health/Check` for the whole server (empty service name).
pub async fn health(channel: Channel, output: Output) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(rpc_error("checking health"))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    let name = status.as_str_name();
    show(output, || name.to_string(), json!({ "status": name }))?;
    if status != ServingStatus::Serving {
        bail!("faultd is not serving ({name})");
    }
    Ok(())
}
