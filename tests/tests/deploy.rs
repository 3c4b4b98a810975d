//! deploy/: the DaemonSet manifest validates against the Kubernetes schema (kubernetes-validate,
//! pinned in xtask), its policy and arguments are ones faultd accepts, and the Dockerfile builds
//! with the steps README.md documents.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use faultd_tests::clients::python;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `kubernetes-validate --strict` on `path`: (passed, its output).
fn validate(path: &Path) -> (bool, String) {
    let mut cmd = Command::new(python());
    cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(path);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "running {cmd:?}: {e} (`cargo xtask setup` installs kubernetes-validate; point \
             FAULTD_TEST_PYTHON at target/test-venv/bin/python3)"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named"),
        "kubernetes-validate is not installed for {:?}: {text}",
        python()
    );
    (out.status.success(), text)
}

/// The manifest's documents as JSON (PyYAML comes with kubernetes-validate).
fn documents(path: &Path) -> Vec<Value> {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "parsing {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json from python")
}

#[test]
fn the_daemonset_manifest_validates_and_faultd_accepts_its_policy_and_args() {
    let manifest = repo().join("deploy/faultd.yaml");
    let (ok, output) = validate(&manifest);
    assert!(ok, "deploy/faultd.yaml does not validate:\n{output}");

    // The validator does catch a broken manifest: the same with a wrong type in it.
    let dir = faultd_tests::TempDir::new("faultd-test-manifest");
    let broken = dir.join("broken.yaml");
    let text = read("deploy/faultd.yaml");
    assert!(text.contains("hostPID: true"));
    std::fs::write(
        &broken,
        text.replacen("hostPID: true", "hostPID: \"yes\"", 1),
    )
    .unwrap();
    let (ok, output) = validate(&broken);
    assert!(
        !ok && output.contains("hostPID"),
        "a manifest with hostPID: \"yes\" should fail validation:\n{output}"
    );

    let docs = documents(&manifest);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"] {
        assert!(
            kinds.contains(&kind),
            "no {kind} in the manifest: {kinds:?}"
        );
    }
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["policy.toml"].as_str())
        .expect("the ConfigMap holds policy.toml");
    let policy = faultd::policy::Policy::from_toml(policy)
        .unwrap_or_else(|e| panic!("faultd refuses the manifest's policy: {e}"));
    assert!(!policy.allow_host_scope, "the host scope must stay off");

    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "tolerate every taint"
    );
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect();
    let config = faultd::config::Config::try_parse_from(
        std::iter::once("faultd".to_string()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("faultd refuses the manifest's args {args:?}: {e}"));
    assert_eq!(
        config.socket,
        Path::new("/run/faultd/faultd.sock"),
        "the socket is in the hostPath /run/faultd"
    );
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for path in [
        "/run/faultd",
        "/sys/fs/bpf",
        "/host/proc",
        "/host/sys/fs/cgroup",
    ] {
        assert!(mounts.contains(&path), "no mount at {path}: {mounts:?}");
    }
    let cgroup_root = config.cgroup_root.expect("--cgroup-root");
    assert!(
        mounts.contains(&cgroup_root.to_str().unwrap()),
        "--cgroup-root {} is not a mount",
        cgroup_root.display()
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let command = container[probe]["exec"]["command"].to_string();
        assert!(
            command.contains("faultctl") && command.contains("health"),
            "{probe} should run `faultctl health`: {command}"
        );
    }
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"].is_object());
}

/// The commands of the build stage between the markers: each `RUN` split on `&&`.
fn dockerfile_steps(dockerfile: &str) -> Vec<String> {
    let start = dockerfile
        .find("# BUILD-STEPS-BEGIN")
        .expect("BUILD-STEPS-BEGIN in the Dockerfile");
    let end = dockerfile
        .find("# BUILD-STEPS-END")
        .expect("BUILD-STEPS-END in the Dockerfile");
    dockerfile[start..end]
        .replace("\\\n", " ")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("RUN "))
        // BuildKit/buildah cache mounts change where files are kept, not the command.
        .map(|run| {
            let mut rest = run.trim_start();
            while let Some(after) = rest.strip_prefix("--mount=") {
                rest = after
                    .split_once(char::is_whitespace)
                    .map_or("", |(_, r)| r.trim_start());
            }
            rest
        })
        .flat_map(|run| run.split("&&").map(normalize).collect::<Vec<_>>())
        .collect()
}

/// The commands of README's "Container image" block.
fn readme_steps(readme: &str) -> Vec<String> {
    let section = readme
        .split("## Container image")
        .nth(1)
        .expect("a \"Container image\" section in README.md");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a sh block in \"Container image\"");
    block
        .replace("\\\n", " ")
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.trim().starts_with('#'))
        .flat_map(|line| line.split("&&").map(normalize).collect::<Vec<_>>())
        .collect()
}

fn normalize(command: &str) -> String {
    command.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_dockerfile_builds_with_the_steps_the_readme_documents() {
    let dockerfile = read("deploy/Dockerfile");
    let readme = read("README.md");
    let docker = dockerfile_steps(&dockerfile);
    let documented = readme_steps(&readme);
    assert!(
        docker
            .iter()
            .any(|s| s.starts_with("cargo build --release")),
        "the Dockerfile's build stage builds nothing: {docker:?}"
    );
    assert_eq!(
        docker, documented,
        "deploy/Dockerfile's build steps and README.md's \"Container image\" differ"
    );

    // And they are the toolchain `cargo xtask setup` installs.
    let xtask = read("xtask/src/main.rs");
    let install = docker
        .iter()
        .find(|s| s.starts_with("apt-get install"))
        .expect("an apt-get install step");
    for package in install
        .split_whitespace()
        .skip(2)
        .filter(|w| !w.starts_with('-'))
    {
        assert!(
            xtask.contains(&format!("\"{package}\"")),
            "the Dockerfile installs {package}, which xtask's PACKAGES do not list"
        );
    }
    let linker = docker
        .iter()
        .find(|s| s.contains("cargo install bpf-linker@"))
        .expect("a bpf-linker step");
    let version = linker
        .split("bpf-linker@")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a bpf-linker version");
    assert!(
        xtask.contains(&format!("BPF_LINKER_VERSION: &str = \"{version}\"")),
        "the Dockerfile installs bpf-linker {version}, xtask another version"
    );
    // The runtime image carries what the manifest's probes and the DaemonSet run.
    let runtime = dockerfile
        .split("# BUILD-STEPS-END")
        .nth(1)
        .expect("a runtime stage");
    for binary in ["target/release/faultd", "target/release/faultctl"] {
        assert!(
            runtime.contains(binary),
            "the build stage does not hand over {binary}"
        );
    }
    let copy = runtime
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the runtime stage copies from the build stage");
    for binary in ["faultd", "faultctl"] {
        assert!(
            copy.contains(&format!("/{binary} ")),
            "the runtime image lacks {binary}: {copy}"
        );
    }
}
