//! A node of the test's own: a real containerd (Debian's 1.6, its own root, state and socket
//! in a temporary directory, runc with the cgroupfs driver, CNI bridge networking on a bridge
//! and a /24 of its own) driven through the CRI as the kubelet drives it. Pods get their cgroup
//! in their QoS class below a cgroup root of the test's own (`faultd-test-<uniq>`, as the
//! kubelet's `--cgroup-root` places `kubepods`), their own network namespace and an IP.
//!
//! Dropping the [`Node`] stops and removes every container and sandbox, stops containerd and
//! its shims, and removes what they leave: images and snapshots (the root directory), CNI
//! state, the bridge, the cgroups in every hierarchy.

mod agent;
mod daemonset;
mod dockerfile;
mod host;
mod image;
pub mod loops;
pub mod scenarios;

pub use agent::{Exec, FaultdPod};
pub use daemonset::{Faultd as FaultdManifest, Source, VolumeMount, manifest_path};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tonic::transport::Channel;

use crate::cgroup::cgroup2_root;
use crate::clients::ConnClient;
use crate::kube::{Driver, Qos, pod_cgroup, pod_uid};
use crate::process::{ChildGuard, describe, output, poll, run_ok, signal, stop};
use crate::servers::{POSTGRES_BIN, POSTGRES_PORT, REDIS_PORT, postgres_user};
use crate::tempdir::TempDir;
use crate::uniq::uniq;
use host::{
    free_bridge_name, free_subnet, processes_naming, python_dirs, remove_cgroups, test_python,
    unmount_below,
};

/// The CRI subset of `proto/cri.proto` (package `runtime.v1`).
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::runtime_service_client::RuntimeServiceClient;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Where the test clients (`tests/clients`) appear in a container.
const CLIENTS_IN_CONTAINER: &str = "/faultd-clients";

/// A running pod sandbox.
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub sandbox_id: String,
    /// Its address on the node's bridge.
    pub ip: String,
    /// Its cgroup in the cgroup v2 hierarchy.
    pub cgroup_dir: PathBuf,
    config: api::PodSandboxConfig,
}

/// A running container.
pub struct Container {
    pub id: String,
    pub name: String,
    /// Its main process (host pid).
    pub pid: u32,
    /// Its CRI log file.
    pub log: PathBuf,
    /// Its cgroup in the cgroup v2 hierarchy (cgroupfs driver: its id in the pod's).
    pub cgroup_dir: PathBuf,
}

/// What a container runs.
pub struct Spec<'a> {
    pub name: &'a str,
    /// The kubelet's restart count: a restarted container is the same name, attempt + 1.
    pub attempt: u32,
    pub command: Vec<String>,
    /// (uid, gid); root if None.
    pub user: Option<(u32, u32)>,
}

pub struct Node {
    // Drop tears everything down in order; then the directory goes.
    client: Option<RuntimeServiceClient<Channel>>,
    containers: Vec<String>,
    /// Containers stopped with SIGTERM and a grace period at teardown (faultd: it reverts).
    graceful: Vec<String>,
    sandboxes: Vec<String>,
    faultd_image_imported: bool,
    /// Host files and directories outside `dir` that a hostPath volume made.
    created_host_files: Vec<PathBuf>,
    containerd: Option<ChildGuard>,
    address: PathBuf,
    bridge: String,
    network: String,
    /// `faultd-test-<uniq>`: the name of the cgroup root in every hierarchy.
    cgroup_name: String,
    /// Host directories the Python clients need (the venv, its base Python when that is not
    /// under /usr), mounted read-only at the same paths.
    python_dirs: Vec<PathBuf>,
    python: PathBuf,
    /// Host directories containerd and libcni make on first use that did not exist before.
    created_host_dirs: Vec<&'static str>,
    dir: TempDir,
}

/// Made by containerd (shim sockets) and libcni (result cache) on first use; children first.
const HOST_DIRS: &[&str] = &[
    "/run/containerd/s",
    "/run/containerd",
    "/var/lib/cni/results",
    "/var/lib/cni",
];

impl Node {
    /// Builds (or reuses) the image, starts containerd and imports the image.
    pub fn start() -> Node {
        crate::require_root();
        let python = test_python();
        let image = image::pod_image();
        let dir = TempDir::new("faultd-test-cri");
        let id = uniq();
        let cgroup_name = format!("faultd-test-{id}");
        let mut node = Node {
            client: None,
            containers: Vec::new(),
            graceful: Vec::new(),
            sandboxes: Vec::new(),
            faultd_image_imported: false,
            created_host_files: Vec::new(),
            containerd: None,
            address: dir.join("containerd.sock"),
            bridge: free_bridge_name(),
            network: format!("faultd-test-{id}"),
            cgroup_name,
            python_dirs: python_dirs(&python),
            python,
            created_host_dirs: HOST_DIRS
                .iter()
                .copied()
                .filter(|d| !Path::new(d).exists())
                .collect(),
            dir,
        };
        let cgroup_root = node.cgroup_root();
        std::fs::create_dir(&cgroup_root)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cgroup_root.display()));
        let subnet = free_subnet();
        node.write_config(&subnet);

        let log = node.dir.join("containerd.log");
        let file = std::fs::File::create(&log).expect("containerd log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(node.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        node.containerd = Some(ChildGuard::spawn("containerd", &mut cmd));
        let address = node.address.clone();
        let client = poll(START_TIMEOUT, || {
            if let Some(containerd) = node.containerd.as_mut() {
                containerd.assert_running(|| read(&log));
            }
            if !address.exists() {
                return None;
            }
            block_on(async {
                let channel = faultd::client::connect(&address).await.ok()?;
                let mut client = RuntimeServiceClient::new(channel);
                client
                    .version(api::VersionRequest::default())
                    .await
                    .ok()
                    .map(|_| client)
            })
        });
        node.client = Some(client.unwrap_or_else(|| {
            panic!(
                "containerd did not answer the CRI Version call on {} within {START_TIMEOUT:?}; its log:\n{}",
                address.display(),
                read(&log)
            )
        }));
        run_ok(
            node.ctr()
                .args(["images", "import", "--base-name", image::IMAGE])
                .arg(&image),
        );
        node
    }

    /// Where faultd finds the pods: `--cgroup-root` (the kubelet's cgroup root in cgroup v2).
    pub fn cgroup_root(&self) -> PathBuf {
        cgroup2_root().join(&self.cgroup_name)
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.address).args(["-n", "k8s.io"]);
        cmd
    }

    fn write_config(&self, subnet: &str) {
        let d = self.dir.path().display();
        let image = format!("{}:{}", image::IMAGE, image::TAG);
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # Sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE: a machine running these
  # tests (itself a container, say) may not grant it. Clamp to our own instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
"#
        );
        write(&self.dir.join("config.toml"), &config);
        // No ipMasq: the pods talk on the bridge only, and the plugin adds no iptables rules.
        let cni = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.network,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": self.dir.join("ipam"),
                },
            }],
        });
        let cni_dir = self.dir.join("cni");
        std::fs::create_dir(&cni_dir).expect("cni conf dir");
        write(&cni_dir.join("10-faultd-test.conflist"), &cni.to_string());
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone().expect("containerd is up")
    }

    /// RunPodSandbox for a pod `name` of a fresh uid in `qos` (cgroupfs driver).
    pub fn pod(&mut self, name: &str, qos: Qos) -> Pod {
        let namespaces = api::NamespaceOption {
            network: api::NamespaceMode::Pod.into(),
            pid: api::NamespaceMode::Container.into(),
            ipc: api::NamespaceMode::Pod.into(),
        };
        self.pod_with(name, qos, namespaces, false)
    }

    /// RunPodSandbox with these namespaces (NODE for hostNetwork and hostPID) and, as the
    /// kubelet asks when a container of the pod is privileged, a privileged sandbox.
    pub fn pod_with(
        &mut self,
        name: &str,
        qos: Qos,
        namespaces: api::NamespaceOption,
        privileged: bool,
    ) -> Pod {
        let host_network = namespaces.network == i32::from(api::NamespaceMode::Node);
        let uid = pod_uid();
        let relative = pod_cgroup(Driver::Cgroupfs, qos, &uid);
        let log_directory = self.dir.join(&format!("logs/{name}_{uid}"));
        std::fs::create_dir_all(&log_directory).expect("pod log directory");
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "faultd-test".into(),
                attempt: 0,
            }),
            // The node's UTS namespace has the node's name: runc may not set one there.
            hostname: if host_network {
                String::new()
            } else {
                name.into()
            },
            log_directory: log_directory.display().to_string(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/{relative}", self.cgroup_name),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces),
                    privileged,
                }),
            }),
            ..Default::default()
        };
        let mut client = self.client();
        let sandbox_id = call(
            "RunPodSandbox",
            client.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .pod_sandbox_id;
        self.sandboxes.push(sandbox_id.clone());
        let status = call(
            "PodSandboxStatus",
            client.pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.clone(),
                verbose: false,
            }),
        );
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty() || host_network)
            .unwrap_or_else(|| panic!("pod {name} ({sandbox_id}) got no IP from CNI"));
        let cgroup_dir = self.cgroup_root().join(&relative);
        assert!(
            cgroup_dir.is_dir(),
            "pod {name}: runc should have made its cgroup {} in cgroup v2",
            cgroup_dir.display()
        );
        Pod {
            uid,
            name: name.into(),
            sandbox_id,
            ip,
            cgroup_dir,
            config,
        }
    }

    /// CreateContainer + StartContainer in `pod`, with the host's `/usr`, the test venv and
    /// `tests/clients` mounted read-only.
    pub fn container(&mut self, pod: &Pod, spec: Spec) -> Container {
        let log_path = format!("{}/{}.log", spec.name, spec.attempt);
        let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
        let mut mounts = vec![
            (PathBuf::from("/usr"), PathBuf::from("/usr")),
            (PathBuf::from(CLIENTS_IN_CONTAINER), clients),
        ];
        mounts.extend(self.python_dirs.iter().map(|d| (d.clone(), d.clone())));
        let mounts = mounts
            .into_iter()
            .map(|(inside, host)| api::Mount {
                container_path: inside.display().to_string(),
                host_path: host.display().to_string(),
                readonly: true,
            })
            .collect();
        let security_context = spec
            .user
            .map(|(uid, gid)| api::LinuxContainerSecurityContext {
                run_as_user: Some(api::Int64Value { value: uid.into() }),
                run_as_group: Some(api::Int64Value { value: gid.into() }),
                ..Default::default()
            });
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: spec.name.into(),
                attempt: spec.attempt,
            }),
            image: Some(api::ImageSpec {
                image: format!("{}:{}", image::IMAGE, image::TAG),
            }),
            command: spec.command.clone(),
            mounts,
            log_path,
            linux: Some(api::LinuxContainerConfig { security_context }),
            ..Default::default()
        };
        self.create_and_start(pod, config)
    }

    /// CreateContainer + StartContainer of `config` in `pod`.
    pub fn create_and_start(&mut self, pod: &Pod, config: api::ContainerConfig) -> Container {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let log_path = config.log_path.clone();
        let mut client = self.client();
        let id = call(
            "CreateContainer",
            client.create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }),
        )
        .container_id;
        self.containers.push(id.clone());
        call(
            "StartContainer",
            client.start_container(api::StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        let status = call(
            "ContainerStatus",
            client.container_status(api::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true,
            }),
        );
        let pid = status
            .info
            .get("info")
            .and_then(|info| serde_json::from_str::<Value>(info).ok())
            .and_then(|info| info["pid"].as_u64())
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no pid in the status of container {id}: {status:?}"));
        let cgroup_dir = pod.cgroup_dir.join(&id);
        assert!(
            cgroup_dir.is_dir(),
            "container {name}: runc should have made its cgroup {}",
            cgroup_dir.display()
        );
        Container {
            id,
            name,
            pid,
            cgroup_dir,
            log: Path::new(&pod.config.log_directory).join(log_path),
        }
    }

    /// StopContainer (SIGTERM, then SIGKILL after `grace`) and RemoveContainer, as the kubelet
    /// does before it starts the container again. A container whose process was killed from
    /// outside may still read as running until containerd has handled its exit event: as the
    /// kubelet does, stop and remove again until it goes (10 s at most).
    pub fn remove_container(&mut self, container: &Container, grace: Duration) {
        let mut client = self.client();
        let started = std::time::Instant::now();
        loop {
            call(
                "StopContainer",
                client.stop_container(api::StopContainerRequest {
                    container_id: container.id.clone(),
                    timeout: grace.as_secs() as i64,
                }),
            );
            let removed = try_call(client.remove_container(api::RemoveContainerRequest {
                container_id: container.id.clone(),
            }));
            match removed {
                Ok(_) => break,
                Err(e)
                    if e.contains("still running")
                        && started.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("CRI RemoveContainer failed: {e}"),
            }
        }
        self.containers.retain(|id| *id != container.id);
        self.graceful.retain(|id| *id != container.id);
    }

    /// A container running `conn_client.py MODE ARGS…` and its events, read from its log.
    pub fn client_container(
        &mut self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        mode: &str,
        args: &[&str],
    ) -> (Container, ConnClient) {
        let mut command = vec![
            self.python.display().to_string(),
            format!("{CLIENTS_IN_CONTAINER}/conn_client.py"),
            mode.to_owned(),
        ];
        command.extend(args.iter().map(|a| a.to_string()));
        let container = self.container(
            pod,
            Spec {
                name,
                attempt,
                command,
                user: None,
            },
        );
        let label = format!("container {name} of pod {}", pod.name);
        let events = ConnClient::follow_log(&container.log, &label);
        (container, events)
    }

    /// A pod running `redis-server` on its IP, port 6379, once it answers PING.
    pub fn redis_pod(&mut self) -> Pod {
        let pod = self.pod("redis", Qos::Burstable);
        let command = [
            "/usr/bin/redis-server",
            "--bind",
            "0.0.0.0",
            "--port",
            &REDIS_PORT.to_string(),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ];
        let server = self.server(&pod, "redis-server", &command, None);
        let mut ping = Command::new("redis-cli");
        ping.args(["-h", &pod.ip, "-p", &REDIS_PORT.to_string(), "ping"]);
        self.wait_ready(&server, &mut ping, "PONG");
        pod
    }

    /// A pod running PostgreSQL 15 (trust auth, fsync off) on its IP, port 5432, once it
    /// answers `select 1`.
    pub fn postgres_pod(&mut self) -> Pod {
        let pod = self.pod("postgres", Qos::Guaranteed);
        let script = format!(
            "set -e; {POSTGRES_BIN}/initdb -D /tmp/pg --auth=trust -U postgres --no-sync \
             --no-instructions -E UTF8 --locale=C >/dev/null; \
             echo 'host all all 0.0.0.0/0 trust' >> /tmp/pg/pg_hba.conf; \
             exec {POSTGRES_BIN}/postgres -D /tmp/pg -c listen_addresses='*' -p {POSTGRES_PORT} \
             -k /tmp -c fsync=off"
        );
        let server = self.server(
            &pod,
            "postgres",
            &["/bin/sh", "-c", &script],
            Some(postgres_user()),
        );
        let mut select = Command::new("psql");
        select
            .args(["-h", &pod.ip, "-p", &POSTGRES_PORT.to_string()])
            .args(["-U", "postgres", "-Atc", "select 1"])
            .env("PGCONNECT_TIMEOUT", "2");
        self.wait_ready(&server, &mut select, "1");
        pod
    }

    fn server(
        &mut self,
        pod: &Pod,
        name: &str,
        command: &[&str],
        user: Option<(u32, u32)>,
    ) -> Container {
        self.container(
            pod,
            Spec {
                name,
                attempt: 0,
                command: command.iter().map(|c| c.to_string()).collect(),
                user,
            },
        )
    }

    fn wait_ready(&self, server: &Container, probe: &mut Command, answer: &str) {
        let ready = poll(START_TIMEOUT, || {
            let out = output(probe);
            (String::from_utf8_lossy(&out.stdout).trim() == answer).then_some(())
        });
        assert!(
            ready.is_some(),
            "container {} did not answer `{}` within {START_TIMEOUT:?}; its log:\n{}",
            server.name,
            describe(probe),
            read(&server.log)
        );
    }

    fn teardown(&mut self) {
        if let Some(mut client) = self.client.take() {
            for id in self.containers.drain(..).rev() {
                let timeout = if self.graceful.contains(&id) { 10 } else { 0 };
                let stopped = try_call(client.stop_container(api::StopContainerRequest {
                    container_id: id.clone(),
                    timeout,
                }));
                let removed = try_call(client.remove_container(api::RemoveContainerRequest {
                    container_id: id.clone(),
                }));
                if let Err(e) = stopped.and(removed) {
                    eprintln!("warning: removing container {id}: {e}");
                }
            }
            for id in self.sandboxes.drain(..).rev() {
                let stopped = try_call(client.stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }));
                let removed = try_call(client.remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }));
                if let Err(e) = stopped.and(removed) {
                    eprintln!("warning: removing pod sandbox {id}: {e}");
                }
            }
        }
        if let Some(mut containerd) = self.containerd.take() {
            stop(&mut containerd.child, libc::SIGTERM, Duration::from_secs(5));
            if std::thread::panicking() {
                let log = read(&self.dir.join("containerd.log"));
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("containerd's log, last lines first:\n{}", tail.join("\n"));
            }
        }
        // Shims outlive containerd by design; ours name its socket.
        for pid in processes_naming(&self.address.display().to_string()) {
            eprintln!("warning: killing containerd shim {pid} left behind");
            signal(pid, libc::SIGKILL);
        }
        unmount_below(self.dir.path());
        remove_cgroups(&self.cgroup_name);
        let link = output(Command::new("ip").args(["link", "show", "dev", &self.bridge]));
        if link.status.success() {
            let out = output(Command::new("ip").args(["link", "del", "dev", &self.bridge]));
            if !out.status.success() {
                eprintln!("warning: ip link del {}: {:?}", self.bridge, out);
            }
        }
        // libcni caches each ADD's result until its DEL.
        let results = Path::new("/var/lib/cni/results");
        for entry in std::fs::read_dir(results).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{}-", self.network))
            {
                eprintln!("warning: removing CNI cache {}", entry.path().display());
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    eprintln!("warning: {e}");
                }
            }
        }
        for path in self.created_host_files.drain(..) {
            let removed = if path.is_dir() {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                eprintln!(
                    "warning: removing {}, which a hostPath volume made: {e}",
                    path.display()
                );
            }
        }
        for dir in &self.created_host_dirs {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("warning: removing {dir}, which this node's containerd made: {e}");
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Runs `fut` to completion on the test's multi-thread runtime, from sync code.
fn block_on<F: Future>(fut: F) -> F::Output {
    let handle = tokio::runtime::Handle::try_current()
        .expect("the CRI node is driven from a #[tokio::test(flavor = \"multi_thread\")]");
    tokio::task::block_in_place(|| handle.block_on(fut))
}

fn try_call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match block_on(tokio::time::timeout(CALL_TIMEOUT, fut)) {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

fn call<T>(what: &str, fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> T {
    try_call(fut).unwrap_or_else(|e| panic!("CRI {what} failed: {e}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
