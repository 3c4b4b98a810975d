//! `cargo xtask vm-test`: the kernel matrix. Boots other kernels under qemu (software
//! emulation) with faultd, faultctl and the `fd-vmguest` test program in the initramfs, and
//! runs the delay, bandwidth and drop tests there, so the netem and EDT paths — which the
//! host kernel may lack — and the kernels without TCX are tested for real.
//!
//! Everything it needs it installs itself, idempotently: qemu from bookworm-backports (with
//! qemu-utils, which bookworm's own qemu would downgrade), and the kernels and busybox as
//! .debs unpacked under `target/vm/` (5.10 from bullseye through a private apt configuration
//! that leaves the system's sources alone). Each guest reports `RESULT rc=N` on its serial
//! console; its whole console log is kept in `target/vm/<kernel>.log`.

use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{is_root, package_installed, status};

/// A kernel of the matrix: its label, the meta package that names the current version, and
/// the Debian release it comes from.
struct Kernel {
    label: &'static str,
    meta: &'static str,
    release: Release,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Release {
    Bookworm,
    Bullseye,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "5.10",
        meta: "linux-image-cloud-amd64",
        release: Release::Bullseye,
    },
    Kernel {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
        release: Release::Bookworm,
    },
    Kernel {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
        release: Release::Bookworm,
    },
];

/// The qdiscs and classifiers faultd's shaping mechanisms use, loaded at guest boot.
const MODULES: &[&str] = &[
    "sch_htb",
    "sch_netem",
    "sch_fq",
    "sch_ingress",
    "cls_bpf",
    "sch_tbf",
    // SOCK_DESTROY over sock_diag (reset, and resets of request matches).
    "tcp_diag",
];
/// Modules outside net/sched the guest needs (inet_diag and its TCP part: `tcp_diag`).
const IPV4_MODULES: &[&str] = &["inet_diag", "tcp_diag"];
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const BACKPORTS_SOURCES: &str = "Types: deb\nURIs: http://deb.debian.org/debian\n\
Suites: bookworm-backports\nComponents: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
const BULLSEYE_LIST: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";
/// The oldest qemu that boots these kernels' PVH entry quickly and keeps qemu-utils intact.
const QEMU_MAJOR: u32 = 10;
/// A guest that has not reported by then has hung.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Default)]
pub struct Options {
    /// Only kernels whose label starts with one of these (all if empty).
    pub kernels: Vec<String>,
    /// Arguments for the guest test program (e.g. a test name filter).
    pub guest_args: Vec<String>,
}

pub struct Matrix {
    pub passed: u64,
    pub failed: u64,
}

/// `cargo xtask vm-test`: runs the matrix and closes with its own total line.
pub fn vm_test(root: &Path, options: &Options) -> anyhow::Result<()> {
    let matrix = run_matrix(root, options)?;
    println!(
        "vm-test: {} passed, {} failed",
        matrix.passed, matrix.failed
    );
    if matrix.failed > 0 {
        bail!("the kernel matrix failed; console logs are in target/vm/");
    }
    Ok(())
}

/// Runs the matrix: one guest per kernel, each passing only if it reported rc=0.
pub fn run_matrix(root: &Path, options: &Options) -> anyhow::Result<Matrix> {
    let started = Instant::now();
    if !is_root() {
        bail!("the kernel matrix installs qemu and kernels: run `sudo -E cargo xtask vm-test`");
    }
    let vm = root.join("target/vm");
    fs::create_dir_all(&vm)?;
    install_qemu()?;
    let busybox = fetch_busybox(&vm)?;
    let binaries = build_static(root)?;
    let base = build_base_image(&vm, &busybox)?;
    let bins = build_bin_image(&vm, &busybox, &binaries)?;

    let selected: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| {
            // "6.1" is 6.1 only, "6" every 6.x.
            options.kernels.is_empty()
                || options
                    .kernels
                    .iter()
                    .any(|s| k.label == s || k.label.starts_with(&format!("{s}.")))
        })
        .collect();
    if selected.is_empty() {
        bail!("no kernel matches {:?}", options.kernels);
    }
    let mut results = Vec::new();
    for kernel in selected {
        let image = fetch_kernel(&vm, kernel)?;
        let modules = build_module_image(&vm, &busybox, &image)?;
        let initrd = vm.join(format!("initrd-{}.cpio.gz", kernel.label));
        concat(&[&base, &modules, &bins], &initrd)?;
        let took = Instant::now();
        let rc = boot(
            &vm,
            kernel.label,
            &image.vmlinuz,
            &initrd,
            &options.guest_args,
        )?;
        results.push((kernel.label, rc, took.elapsed()));
    }
    println!("xtask: kernel matrix:");
    for (label, rc, took) in &results {
        let verdict = match rc {
            Some(0) => "passed".to_string(),
            Some(rc) => format!("FAILED (rc={rc})"),
            None => "FAILED (no RESULT line)".to_string(),
        };
        println!(
            "xtask:   {label:<5} {verdict} in {:.1} s",
            took.as_secs_f64()
        );
    }
    let failed = results.iter().filter(|(_, rc, _)| *rc != Some(0)).count() as u64;
    println!(
        "xtask: kernel matrix took {:.1} s (build and boot included)",
        started.elapsed().as_secs_f64()
    );
    Ok(Matrix {
        passed: results.len() as u64 - failed,
        failed,
    })
}

fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split("version ").nth(1)?;
    version.split('.').next()?.parse().ok()
}

/// qemu-system-x86 and qemu-utils from bookworm-backports.
fn install_qemu() -> anyhow::Result<()> {
    if qemu_major().is_some_and(|v| v >= QEMU_MAJOR) && package_installed("qemu-utils") {
        return Ok(());
    }
    if !Path::new(BACKPORTS_LIST).exists() {
        fs::write(BACKPORTS_LIST, BACKPORTS_SOURCES)
            .with_context(|| format!("writing {BACKPORTS_LIST}"))?;
    }
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(["-t", "bookworm-backports", "qemu-system-x86", "qemu-utils"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if qemu_major().is_none_or(|v| v < QEMU_MAJOR) {
        bail!("qemu-system-x86_64 {QEMU_MAJOR} or later is still missing after installing it");
    }
    Ok(())
}

/// apt-get/apt-cache, for bullseye with a private configuration under `target/vm/apt`.
fn apt(vm: &Path, release: Release, tool: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(tool);
    if release == Release::Bullseye {
        let dir = vm.join("apt-bullseye");
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let list = dir.join("sources.list");
        if !list.exists() {
            fs::write(&list, BULLSEYE_LIST)?;
        }
        let status_file = dir.join("status");
        if !status_file.exists() {
            fs::write(&status_file, "")?;
        }
        let option = |key: &str, value: &Path| format!("-o{key}={}", value.display());
        cmd.arg(option("Dir::Etc::SourceList", &list))
            .arg("-oDir::Etc::SourceParts=/nonexistent")
            .arg(option("Dir::State::Lists", &dir.join("lists")))
            .arg(option("Dir::Cache", &dir.join("cache")))
            .arg(option("Dir::State::status", &status_file))
            .arg("-oDebug::NoLocking=1");
    }
    Ok(cmd)
}

/// The versioned package the meta package depends on now (the ABI number changes).
fn resolve(vm: &Path, release: Release, meta: &str) -> anyhow::Result<String> {
    if release == Release::Bullseye {
        let lists = vm.join("apt-bullseye/lists");
        let has_lists = fs::read_dir(&lists)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name() != "partial"))
            .unwrap_or(false);
        if !has_lists {
            status(apt(vm, release, "apt-get")?.args(["update", "-q"]))?;
        }
    }
    let out = apt(vm, release, "apt-cache")?
        .args(["depends", meta])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| {
            let name = line.trim().strip_prefix("Depends: ")?;
            name.starts_with("linux-image-").then(|| name.to_string())
        })
        .with_context(|| {
            format!(
                "apt-cache depends {meta} names no linux-image package (run apt-get update?): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Downloads `package` with apt and unpacks it into `dest` (once).
fn fetch_deb(vm: &Path, release: Release, package: &str, dest: &Path) -> anyhow::Result<()> {
    if dest.join(".unpacked").exists() {
        return Ok(());
    }
    let debs = vm.join("debs");
    fs::create_dir_all(&debs)?;
    status(
        apt(vm, release, "apt-get")?
            .args(["download", "-q", package])
            .current_dir(&debs),
    )?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                debs.display()
            )
        })?;
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::create_dir_all(dest)?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))?;
    fs::write(dest.join(".unpacked"), "")?;
    fs::remove_file(&deb)?;
    Ok(())
}

fn fetch_busybox(vm: &Path) -> anyhow::Result<PathBuf> {
    let dest = vm.join("busybox-static");
    fetch_deb(vm, Release::Bookworm, "busybox-static", &dest)?;
    Ok(dest.join("bin/busybox"))
}

struct KernelImage {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn fetch_kernel(vm: &Path, kernel: &Kernel) -> anyhow::Result<KernelImage> {
    let package = resolve(vm, kernel.release, kernel.meta)?;
    let dest = vm.join("kernels").join(&package);
    fetch_deb(vm, kernel.release, &package, &dest)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let vmlinuz = dest.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing from {package}", vmlinuz.display());
    }
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| dest.join(dir).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules directory for {release} in {package}"))?;
    Ok(KernelImage {
        release,
        vmlinuz,
        modules,
    })
}

/// faultd, faultctl and fd-vmguest, statically linked (the guest has no libc).
struct Binaries {
    dir: PathBuf,
}

fn build_static(root: &Path) -> anyhow::Result<Binaries> {
    let mut cmd = crate::cargo();
    cmd.args(["build", "--release", "--target", HOST_TARGET])
        .args(["-p", "faultd-agent", "--bin", "faultd", "--bin", "faultctl"])
        .args(["-p", "faultd-tests", "--bin", "fd-vmguest"])
        // Only the target's artifacts: build scripts and the nested eBPF build keep theirs.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        );
    status(&mut cmd)?;
    Ok(Binaries {
        dir: root.join("target").join(HOST_TARGET).join("release"),
    })
}

/// Packs `dir` as a gzipped newc cpio archive with busybox's cpio.
fn pack(busybox: &Path, dir: &Path, out: &Path) -> anyhow::Result<()> {
    let script = format!(
        "cd '{}' && find . | '{}' cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        dir.display(),
        busybox.display(),
        out.display()
    );
    status(Command::new("sh").args(["-c", &script]))
}

fn concat(parts: &[&Path], out: &Path) -> anyhow::Result<()> {
    let mut file = fs::File::create(out)?;
    for part in parts {
        file.write_all(&fs::read(part)?)?;
    }
    Ok(())
}

const INIT: &str = r#"#!/bin/sh
# faultd kernel matrix guest: mount, load the qdisc modules, run the tests, report, power off.
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
for m in $(cat /etc/faultd-modules); do
  modprobe "$m" || echo "guest: modprobe $m failed"
done
echo "guest: kernel $(uname -r), $(nproc) cpus"
# fd_vmguest_args comes from the kernel command line (unknown parameters become init's environment).
/bin/fd-vmguest $fd_vmguest_args
echo "RESULT rc=$?"
poweroff -f
"#;

/// busybox, iproute2's tc with its libraries and distribution tables, and /init.
fn build_base_image(vm: &Path, busybox: &Path) -> anyhow::Result<PathBuf> {
    let dir = vm.join("root-base");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    for sub in [
        "bin", "sbin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "lib64",
    ] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::copy(busybox, dir.join("bin/busybox"))?;
    let applets = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
        }
    }
    // iproute2's tc, called by full path (busybox has a tc applet of its own).
    fs::copy("/usr/sbin/tc", dir.join("usr/sbin/tc")).context("copying /usr/sbin/tc (iproute2)")?;
    let ldd = Command::new("ldd").arg("/usr/sbin/tc").output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if lib.starts_with('/') {
            let dest = dir.join(lib.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap_or(&dir))?;
            fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
        }
    }
    let dist = Path::new("/usr/lib/x86_64-linux-gnu/tc");
    if dist.is_dir() {
        let dest = dir.join("usr/lib/x86_64-linux-gnu/tc");
        fs::create_dir_all(&dest)?;
        for entry in fs::read_dir(dist)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "dist")
                && let Some(name) = path.file_name()
            {
                fs::copy(&path, dest.join(name))?;
            }
        }
    }
    fs::write(dir.join("init"), INIT)?;
    set_executable(&dir.join("init"))?;
    fs::write(dir.join("etc/faultd-modules"), MODULES.join("\n"))?;
    let out = vm.join("base.cpio.gz");
    pack(busybox, &dir, &out)?;
    Ok(out)
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn build_bin_image(vm: &Path, busybox: &Path, binaries: &Binaries) -> anyhow::Result<PathBuf> {
    let dir = vm.join("root-bin");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(dir.join("bin"))?;
    for name in ["faultd", "faultctl", "fd-vmguest"] {
        let src = binaries.dir.join(name);
        fs::copy(&src, dir.join("bin").join(name))
            .with_context(|| format!("copying {}", src.display()))?;
    }
    let out = vm.join("bin.cpio.gz");
    pack(busybox, &dir, &out)?;
    Ok(out)
}

/// The kernel's net/sched modules and `IPV4_MODULES` (decompressed), with a modules.dep from
/// busybox depmod.
fn build_module_image(vm: &Path, busybox: &Path, image: &KernelImage) -> anyhow::Result<PathBuf> {
    // Named after what it holds, so an image cached before the diag modules is not reused.
    let out = vm.join(format!("modules-{}-diag.cpio.gz", image.release));
    if out.exists() {
        return Ok(out);
    }
    let dir = vm.join(format!("root-modules-{}", image.release));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let base = format!("lib/modules/{}", image.release);
    let sched = dir.join(&base).join("kernel/net/sched");
    fs::create_dir_all(&sched)?;
    let ipv4 = dir.join(&base).join("kernel/net/ipv4");
    fs::create_dir_all(&ipv4)?;
    let mut sources = Vec::new();
    for entry in fs::read_dir(image.modules.join("kernel/net/sched"))? {
        sources.push((entry?.path(), sched.clone()));
    }
    for entry in fs::read_dir(image.modules.join("kernel/net/ipv4"))? {
        let path = entry?.path();
        let stem = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next());
        if stem.is_some_and(|stem| IPV4_MODULES.contains(&stem)) {
            sources.push((path, ipv4.clone()));
        }
    }
    for (path, sched) in sources {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(".xz") {
            let data = Command::new("xz")
                .args(["-dc"])
                .arg(&path)
                .output()
                .context("xz -dc")?;
            if !data.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            fs::write(sched.join(stem), data.stdout)?;
        } else if name.ends_with(".ko") {
            fs::copy(&path, sched.join(name))?;
        }
    }
    status(
        Command::new(busybox)
            .args(["depmod", "-b"])
            .arg(&dir)
            .arg(&image.release),
    )?;
    pack(busybox, &dir, &out)?;
    fs::remove_dir_all(&dir)?;
    Ok(out)
}

/// Boots one guest; echoes its console and returns the rc of its RESULT line.
fn boot(
    vm: &Path,
    label: &str,
    vmlinuz: &Path,
    initrd: &Path,
    guest_args: &[String],
) -> anyhow::Result<Option<i32>> {
    let args = guest_args.join(" ");
    let log_path = vm.join(format!("{label}.log"));
    let mut log = fs::File::create(&log_path)?;
    eprintln!("xtask: booting {label} ({})", vmlinuz.display());
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 fd_vmguest_args=\"{}\"",
            args.replace('"', "")
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut rc = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                let clean: String = line.chars().filter(|c| !c.is_control()).collect();
                writeln!(log, "{clean}")?;
                println!("[{label}] {clean}");
                if let Some(value) = clean.split("RESULT rc=").nth(1) {
                    rc = value.trim().parse().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "xtask: the {label} guest did not finish in {GUEST_TIMEOUT:?}; stopping it"
                );
                child.kill()?;
                break;
            }
        }
    }
    child.wait()?;
    if reader.join().is_err() {
        eprintln!("xtask: the console reader of {label} panicked");
    }
    Ok(rc)
}

/// Where `cargo xtask test` finds out whether to run the matrix: always, except when
/// FAULTD_VM_TEST=0 is set outside CI (a developer iterating on something else).
pub fn wanted() -> bool {
    env::var_os("CI").is_some() || !env::var("FAULTD_VM_TEST").is_ok_and(|v| v == "0")
}
