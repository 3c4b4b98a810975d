//! faultd run on the test's node as `deploy/faultd.yaml` declares it: a privileged container in
//! a pod with the node's pid and network namespaces, its volumes mounted, its args and env, from
//! the image `deploy/Dockerfile` builds (see `dockerfile`). What
//! differs from the manifest, because a test node is not a node of its own:
//! - the image: the one built here from `deploy/Dockerfile`, not `ghcr.io/faultd/faultd`;
//! - `--cgroup-root`: the manifest's mount of the node's `/sys/fs/cgroup` joined with the test
//!   node's cgroup root below it (a kubelet's `--cgroup-root`), where this node's pods are;
//! - `--metrics-addr`: a free port on the same address (other agents may hold 9464);
//! - the hostPath `/run/faultd`: a directory of the test's own (the socket, the state).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::daemonset::{Faultd as Manifest, Source};
use super::{Container, Node, Pod, api, call, dockerfile};
use crate::kube::Qos;
use crate::process::run_ok;

/// The entrypoint of `deploy/Dockerfile`'s image.
const FAULTD_ENTRYPOINT: &str = "/usr/local/bin/faultd";

/// Host paths of the manifest that stand for a directory of the test's own.
const OWN_HOST_DIRS: &[&str] = &["/run/faultd"];

/// The faultd pod: its sandbox and what its containers are made of.
pub struct FaultdPod {
    pub pod: Pod,
    pub manifest: Manifest,
    /// The host directory behind the manifest's hostPath `/run/faultd`.
    pub run_dir: PathBuf,
    args: Vec<String>,
    mounts: Vec<api::Mount>,
}

/// What ExecSync returned.
#[derive(Debug)]
pub struct Exec {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Exec {
    pub fn assert_success(&self, what: &str) -> &Exec {
        assert!(
            self.exit_code == 0,
            "{what}: exit code {}: {self:?}",
            self.exit_code
        );
        self
    }
}

impl Node {
    /// RunPodSandbox for the DaemonSet's pod (hostPID, hostNetwork, privileged), and the files
    /// and directories behind its volumes.
    pub fn faultd_pod(&mut self, manifest: &Manifest) -> FaultdPod {
        let mode = |node: bool, otherwise: api::NamespaceMode| {
            if node {
                api::NamespaceMode::Node
            } else {
                otherwise
            }
            .into()
        };
        let namespaces = api::NamespaceOption {
            network: mode(manifest.host_network(), api::NamespaceMode::Pod),
            pid: mode(manifest.host_pid(), api::NamespaceMode::Container),
            ipc: api::NamespaceMode::Pod.into(),
        };
        // requests below limits: Burstable.
        let pod = self.pod_with("faultd", Qos::Burstable, namespaces, manifest.privileged());

        let run_dir = self.dir.join("run-faultd");
        let mut mounts = Vec::new();
        for volume in manifest.mounts() {
            let host_path = match &volume.source {
                Source::HostPath { path, kind } => {
                    let own = OWN_HOST_DIRS.iter().any(|d| path == Path::new(d));
                    let host = if own { run_dir.clone() } else { path.clone() };
                    self.make_host_path(&host, kind);
                    host
                }
                Source::ConfigMap(data) => {
                    let dir = self.dir.join(&format!("configmap-{}", volume.name));
                    std::fs::create_dir_all(&dir)
                        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                    for (key, text) in data {
                        super::write(&dir.join(key), text);
                    }
                    dir
                }
            };
            mounts.push(api::Mount {
                container_path: volume.mount_path.display().to_string(),
                host_path: host_path.display().to_string(),
                readonly: volume.read_only,
            });
        }

        let cgroup_flag = "--cgroup-root";
        let cgroup_mount = manifest
            .arg(cgroup_flag)
            .unwrap_or_else(|| panic!("the manifest's faultd args should name {cgroup_flag}"));
        let node_sys_fs_cgroup = manifest
            .mounts()
            .into_iter()
            .find(|m| {
                m.source
                    == Source::HostPath {
                        path: "/sys/fs/cgroup".into(),
                        kind: "Directory".into(),
                    }
            })
            .unwrap_or_else(|| panic!("the manifest should mount the node's /sys/fs/cgroup"));
        assert_eq!(
            Path::new(&cgroup_mount),
            node_sys_fs_cgroup.mount_path,
            "{cgroup_flag} should be where the manifest mounts the node's /sys/fs/cgroup"
        );
        let below = self
            .cgroup_root()
            .strip_prefix("/sys/fs/cgroup")
            .expect("the node's cgroup root is below /sys/fs/cgroup")
            .to_path_buf();
        let metrics_flag = "--metrics-addr";
        let metrics = manifest
            .arg(metrics_flag)
            .unwrap_or_else(|| panic!("the manifest's faultd args should name {metrics_flag}"));
        let (host, _) = metrics
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{metrics_flag}={metrics} is no address"));
        let free = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("a free port on {host}: {e}"));
        let replace = BTreeMap::from([
            (
                cgroup_flag,
                Path::new(&cgroup_mount).join(below).display().to_string(),
            ),
            (metrics_flag, free.to_string()),
        ]);
        let args = manifest.args(&replace);
        FaultdPod {
            pod,
            manifest: manifest.clone(),
            run_dir,
            args,
            mounts,
        }
    }

    /// A hostPath the kubelet makes when its type says so (`DirectoryOrCreate`,
    /// `FileOrCreate`), and checks otherwise; what this makes on the host goes at teardown.
    fn make_host_path(&mut self, path: &Path, kind: &str) {
        if path.exists() {
            return;
        }
        match kind {
            "DirectoryOrCreate" => {
                std::fs::create_dir_all(path)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            }
            "FileOrCreate" => {
                std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            }
            _ => panic!("hostPath {} ({kind}) does not exist", path.display()),
        }
        if !path.starts_with(self.dir.path()) {
            self.created_host_files.push(path.to_path_buf());
        }
    }

    /// CreateContainer + StartContainer of the DaemonSet's container (restart `attempt`) in
    /// `faultd`'s sandbox, from the image built of `deploy/Dockerfile`.
    pub fn faultd_container(&mut self, faultd: &FaultdPod, attempt: u32) -> Container {
        self.faultd_container_run_by(faultd, attempt, &[])
    }

    /// As `faultd_container`, with the image's entrypoint run by `runner` (a command that
    /// execs its arguments, such as `unshare --cgroup`), as a pod spec's `command` would.
    pub fn faultd_container_run_by(
        &mut self,
        faultd: &FaultdPod,
        attempt: u32,
        runner: &[&str],
    ) -> Container {
        if !self.faultd_image_imported {
            let archive = dockerfile::faultd_image_archive();
            run_ok(
                self.ctr()
                    .args(["images", "import", "--base-name", dockerfile::FAULTD_IMAGE])
                    .arg(&archive),
            );
            self.faultd_image_imported = true;
        }
        let manifest = &faultd.manifest;
        let (add, drop) = manifest.capabilities();
        let security_context = api::LinuxContainerSecurityContext {
            capabilities: Some(api::Capability {
                add_capabilities: add,
                drop_capabilities: drop,
            }),
            privileged: manifest.privileged(),
            ..Default::default()
        };
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: "faultd".into(),
                attempt,
            }),
            image: Some(api::ImageSpec {
                image: format!("{}:{}", dockerfile::FAULTD_IMAGE, dockerfile::FAULTD_TAG),
            }),
            // CRI's command replaces the image's entrypoint; empty keeps it.
            command: if runner.is_empty() {
                Vec::new()
            } else {
                runner
                    .iter()
                    .map(|s| s.to_string())
                    .chain([FAULTD_ENTRYPOINT.to_string()])
                    .collect()
            },
            args: faultd.args.clone(),
            envs: manifest
                .env()
                .into_iter()
                .map(|(key, value)| api::KeyValue { key, value })
                .collect(),
            mounts: faultd.mounts.clone(),
            log_path: format!("faultd/{attempt}.log"),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(security_context),
            }),
            ..Default::default()
        };
        let container = self.create_and_start(&faultd.pod, config);
        // Stopped with SIGTERM at teardown, so that it reverts what it holds.
        self.graceful.push(container.id.clone());
        container
    }

    /// ExecSync `cmd` in `container`, as the kubelet runs an exec probe and `kubectl exec` a
    /// command.
    pub fn exec(&self, container: &Container, cmd: &[&str], timeout: Duration) -> Exec {
        let mut client = self.client();
        let response = call(
            "ExecSync",
            client.exec_sync(api::ExecSyncRequest {
                container_id: container.id.clone(),
                cmd: cmd.iter().map(|c| c.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            }),
        );
        Exec {
            exit_code: response.exit_code,
            stdout: String::from_utf8_lossy(&response.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&response.stderr).into_owned(),
        }
    }

    /// The CRI log of a container.
    pub fn log_of(&self, container: &Container) -> String {
        super::read(&container.log)
    }
}
