//! An in-process faultd for tests: the real gRPC server on a temporary unix socket (or TCP),
//! the fake dataplane standing in for the kernel, and a directory that looks like a cgroup v2
//! root with one cgroup, `/app`. No root needed.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use faultd::api::{Listener, Services};
use faultd::audit::AuditLog;
use faultd::caps::Capabilities;
use faultd::dataplane::fake::FakeDataplane;
use faultd::engine::{Engine, EngineConfig};
use faultd::policy::Policy;
use faultd::target::CgroupRoot;
use faultd_proto::v1 as pb;
use pb::fault_service_client::FaultServiceClient;
use pb::lease_service_client::LeaseServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

pub struct Server {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    pub fake: FakeDataplane,
    pub engine: Arc<Engine>,
    pub services: Services,
    pub stop: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// A server with `policy`, an audit log, serving on its unix socket.
    pub async fn start(name: &str, policy: Policy) -> Server {
        let dir = std::env::temp_dir().join(format!("faultd-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cgroups/app")).unwrap();
        std::fs::write(dir.join("cgroups/cgroup.procs"), "").unwrap();
        std::fs::write(dir.join("cgroups/app/cgroup.procs"), "").unwrap();
        let root = CgroupRoot::at(dir.join("cgroups")).unwrap();
        let fake = FakeDataplane::default();
        let engine = Engine::new(
            Box::new(fake.clone()),
            Box::new(root.clone()),
            EngineConfig {
                policy,
                ..EngineConfig::default()
            },
        );
        let caps = Arc::new(Capabilities::probe(root.path(), Ok(&fake)));
        let audit_log = dir.join("audit.jsonl");
        let audit = Arc::new(AuditLog::open(&audit_log).unwrap());
        let services = Services::new(engine.clone(), caps).with_audit(Some(audit));
        let socket = dir.join("faultd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(
            engine
                .clone()
                .run_expiry(faultd::api::stopped(stopped.clone())),
        );
        tokio::spawn(faultd::api::serve_on(
            services.clone(),
            Listener::Unix(listener),
            stopped,
        ));
        Server {
            dir,
            socket,
            audit_log,
            fake,
            engine,
            services,
            stop,
        }
    }

    /// Also serves on a TCP listener (mTLS if `tls`); returns its address.
    pub async fn listen_tcp(
        &self,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(faultd::api::serve_on(
            self.services.clone(),
            Listener::Tcp { listener, tls },
            self.stop.subscribe(),
        ));
        addr
    }

    pub async fn channel(&self) -> Channel {
        faultd::client::connect(&self.socket).await.unwrap()
    }

    pub async fn faults(&self) -> FaultServiceClient<Channel> {
        FaultServiceClient::new(self.channel().await)
    }

    pub async fn leases(&self) -> LeaseServiceClient<Channel> {
        LeaseServiceClient::new(self.channel().await)
    }

    /// The audit log's lines, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }
}

pub fn ttl(text: &str) -> prost_types::Duration {
    faultd::api::convert::duration_to_proto(faultd::duration::parse(text).unwrap())
}

/// A drop of `percent` on `ports` of cgroup `/app` (tcp, egress).
pub fn drop_fault(percent: f64, ports: &[(u32, Option<u32>)]) -> pb::Fault {
    pb::Fault {
        action: Some(pb::fault::Action::Drop(pb::Drop { percent })),
        target: Some(pb::Target {
            scope: Some(pb::target::Scope::Cgroup(pb::CgroupScope {
                path: "/app".into(),
            })),
            ports: ports
                .iter()
                .map(|&(first, last)| pb::PortRange { first, last })
                .collect(),
            protocol: pb::Protocol::Tcp.into(),
            direction: pb::Direction::Egress.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn inject(fault: pb::Fault, ttl_text: &str) -> pb::InjectRequest {
    pb::InjectRequest {
        lease: Some(pb::inject_request::Lease::Ttl(ttl(ttl_text))),
        fault: Some(fault),
        dry_run: false,
    }
}

pub fn with_scope(mut fault: pb::Fault, scope: pb::target::Scope) -> pb::Fault {
    fault.target.as_mut().unwrap().scope = Some(scope);
    fault
}

pub const SECOND: Duration = Duration::from_secs(1);
