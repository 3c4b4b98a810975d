//! `deploy/faultd.yaml` read as the kubelet reads it, and turned into the CRI calls the kubelet
//! makes for its pod: the sandbox's namespaces (hostPID, hostNetwork), the container's
//! securityContext, its volumes as mounts, its args and env, its probes' commands. The test
//! proves the manifest, not a copy of it: only what a test node must change is changed, by name
//! (see [`Faultd::args`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::process::run_ok;

/// `deploy/faultd.yaml`.
pub fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/faultd.yaml")
}

/// The DaemonSet's pod and its one container, and the ConfigMaps of the manifest.
#[derive(Clone, Debug)]
pub struct Faultd {
    pod: Value,
    container: Value,
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

/// A volume as the container mounts it.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A node directory or file (`hostPath`), with its `type`.
    HostPath { path: PathBuf, kind: String },
    /// The data of a ConfigMap of the manifest, one file per key.
    ConfigMap(BTreeMap<String, String>),
}

#[derive(Clone, Debug)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: PathBuf,
    pub read_only: bool,
    pub source: Source,
}

impl Faultd {
    /// Parses the manifest with PyYAML from the test venv (`FAULTD_TEST_PYTHON`).
    pub fn from_manifest(python: &Path) -> Faultd {
        let path = manifest_path();
        let out = run_ok(
            Command::new(python)
                .args([
                    "-c",
                    "import json, sys, yaml; \
                     json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
                ])
                .arg(&path),
        );
        let docs: Vec<Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{} as JSON: {e}", path.display()));
        let daemonsets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "DaemonSet").collect();
        assert_eq!(
            daemonsets.len(),
            1,
            "{} should hold one DaemonSet",
            path.display()
        );
        let pod = daemonsets[0]["spec"]["template"]["spec"].clone();
        let containers = pod["containers"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            containers.len(),
            1,
            "the DaemonSet's pod should run one container (faultd): {containers:?}"
        );
        let config_maps = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .map(|d| {
                let name = d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let data = d["data"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                (name, data)
            })
            .collect();
        Faultd {
            pod,
            container: containers[0].clone(),
            config_maps,
        }
    }

    pub fn host_pid(&self) -> bool {
        self.pod["hostPID"] == true
    }

    pub fn host_network(&self) -> bool {
        self.pod["hostNetwork"] == true
    }

    pub fn privileged(&self) -> bool {
        self.container["securityContext"]["privileged"] == true
    }

    /// `securityContext.capabilities` (add, drop).
    pub fn capabilities(&self) -> (Vec<String>, Vec<String>) {
        let list = |key: &str| -> Vec<String> {
            self.container["securityContext"]["capabilities"][key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        };
        (list("add"), list("drop"))
    }

    /// The container's `args`, each `--flag=value` whose flag `replace` names given its value.
    pub fn args(&self, replace: &BTreeMap<&str, String>) -> Vec<String> {
        strings(&self.container["args"])
            .into_iter()
            .map(|arg| match arg.split_once('=') {
                Some((flag, _)) if replace.contains_key(flag) => {
                    format!("{flag}={}", replace[flag])
                }
                _ => arg,
            })
            .collect()
    }

    /// The value of `--flag=value` in the container's args.
    pub fn arg(&self, flag: &str) -> Option<String> {
        strings(&self.container["args"])
            .into_iter()
            .find_map(|arg| {
                Some(arg.split_once('=')?)
                    .filter(|(f, _)| *f == flag)
                    .map(|(_, v)| v.to_owned())
            })
    }

    /// `env` entries with a literal value.
    pub fn env(&self) -> Vec<(String, String)> {
        self.container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let name = e["name"].as_str().unwrap_or_default().to_owned();
                let value = e["value"].as_str().unwrap_or_else(|| {
                    panic!("env {name}: only literal values are turned into the CRI here: {e}")
                });
                (name, value.to_owned())
            })
            .collect()
    }

    /// `readinessProbe` / `livenessProbe`: (exec command, timeoutSeconds).
    pub fn probe(&self, which: &str) -> (Vec<String>, u64) {
        let probe = &self.container[which];
        let command = strings(&probe["exec"]["command"]);
        assert!(
            !command.is_empty(),
            "the faultd container's {which} should be an exec probe: {probe}"
        );
        (command, probe["timeoutSeconds"].as_u64().unwrap_or(1))
    }

    /// The container's volumeMounts with their volumes.
    pub fn mounts(&self) -> Vec<VolumeMount> {
        let volumes = self.pod["volumes"].as_array().cloned().unwrap_or_default();
        self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let name = m["name"].as_str().unwrap_or_default().to_owned();
                let volume = volumes
                    .iter()
                    .find(|v| v["name"] == name.as_str())
                    .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
                let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
                    Source::HostPath {
                        path: path.into(),
                        kind: volume["hostPath"]["type"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    }
                } else if let Some(map) = volume["configMap"]["name"].as_str() {
                    Source::ConfigMap(self.config_maps.get(map).cloned().unwrap_or_else(|| {
                        panic!("volume {name}: the manifest has no ConfigMap {map}")
                    }))
                } else {
                    panic!("volume {name}: only hostPath and configMap volumes are turned into mounts here: {volume}")
                };
                VolumeMount {
                    name,
                    mount_path: m["mountPath"].as_str().unwrap_or_default().into(),
                    read_only: m["readOnly"] == true,
                    source,
                }
            })
            .collect()
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {v}"))
                .to_owned()
        })
        .collect()
}
