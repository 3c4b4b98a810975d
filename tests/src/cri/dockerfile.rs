//! faultd's image built from `deploy/Dockerfile` itself, offline, with buildah: no registry is
//! reachable, so the Dockerfile's base images (its `BUILD_BASE` and `RUNTIME_BASE` arguments)
//! are filled with local images of the same content — Debian bookworm from `mmdebstrap`, and
//! for the build stage that Debian with the host's rustup and its Rust 1.95 toolchain in
//! `/usr/local` (as the official `rust:1.95-bookworm` lays them out). The RUN steps reach only
//! the Debian archive and crates.io (`--network host`).
//!
//! Everything is kept under `target/faultd-image/`: buildah's storage (the bases, each step's
//! layer, so an unchanged step is not run again) and the Dockerfile's cache mounts (cargo's
//! downloads and target directory: a changed source rebuilds only the workspace crates). The
//! built image leaves as an OCI archive, which the test imports into its containerd.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use super::host::unmount_below;
use crate::process::{output, run_ok};

/// The name faultd's image is built and imported under (`FAULTD_IMAGE:FAULTD_TAG`).
pub const FAULTD_IMAGE: &str = "faultd-test.local/faultd";
pub const FAULTD_TAG: &str = "dockerfile";

/// Debian's archive, as the official bookworm images list it (the security suite carries
/// `rustc-web` 1.96, which the build stage installs).
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// What `rust:1.95-bookworm` (buildpack-deps) has beyond Debian's minimal base that a Rust
/// build needs: a C toolchain for build scripts and linking, TLS roots for crates.io, and the
/// libraries bpf-linker links with LLVM.
const BUILD_PACKAGES: &[&str] = &[
    "ca-certificates",
    "gcc",
    "g++",
    "libc6-dev",
    "make",
    "pkg-config",
    "zlib1g-dev",
    "libzstd-dev",
    "libffi-dev",
    "libxml2-dev",
];
/// The host's CA bundle (Debian's ca-certificates), at the same path in the build stage.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The Rust release the Dockerfile's default build base pins.
const RUST_RELEASE: &str = "1.95";

/// The OCI archive of faultd's image built from `deploy/Dockerfile` (once per test process;
/// other processes wait on a lock for a build in progress). Prints how long the build took.
pub fn faultd_image_archive() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root");
    let dir = repo.join("target/faultd-image");
    std::fs::create_dir_all(dir.join("tmp"))
        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let _lock = Lock::take(&dir.join("lock"));
    let buildah = Buildah { dir: dir.clone() };
    let started = Instant::now();
    let runtime_base = buildah.base("bookworm", &[], None);
    let build_base = buildah.base("rust-bookworm", BUILD_PACKAGES, Some(&rust_toolchain()));
    let bases_ms = started.elapsed().as_millis();

    let tag = format!("{FAULTD_IMAGE}:{FAULTD_TAG}");
    let previous = Some(buildah.image_id(&tag)).filter(|id| !id.is_empty());
    let built = Instant::now();
    let mut cmd = buildah.command();
    cmd.args([
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--layers",
    ])
    // The RUN steps trust what the host trusts (a TLS-inspecting proxy's CA included),
    // over the bundle the base's ca-certificates makes.
    .args(["--volume", &format!("{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro")])
    .args(["--build-arg", &format!("BUILD_BASE={build_base}")])
    .args(["--build-arg", &format!("RUNTIME_BASE={runtime_base}")])
    .arg("--file")
    .arg(repo.join("deploy/Dockerfile"))
    .args(["--tag", &format!("{FAULTD_IMAGE}:{FAULTD_TAG}")])
    .arg(&repo);
    run_ok(&mut cmd);
    let archive = dir.join("faultd.oci.tar");
    // `push` does not overwrite an archive.
    remove_file(&archive);
    // The archive's reference is the tag; `ctr images import --base-name` adds the name.
    run_ok(buildah.command().args([
        "push",
        &tag,
        &format!("oci-archive:{}:{FAULTD_TAG}", archive.display()),
    ]));
    // The image this build replaced (untagged now); not `rmi --prune`, which would take the
    // untagged images of each step too: they are the layer cache.
    if let Some(old) = previous
        && old != buildah.image_id(&tag)
    {
        buildah.warn_unless_ok(buildah.command().args(["rmi", &old]));
    }
    // The overlay driver leaves its home bind-mounted on itself; nothing of buildah stays
    // mounted once the test is done.
    let home = std::ffi::CString::new(dir.join("storage/overlay").as_os_str().as_encoded_bytes())
        .expect("no NUL in a path");
    // SAFETY: umount2 with a NUL-terminated path; EINVAL (not a mount point) is fine.
    unsafe { libc::umount2(home.as_ptr(), libc::MNT_DETACH) };
    unmount_below(&dir);
    eprintln!(
        "MEASURE faultd image from deploy/Dockerfile: bases {bases_ms} ms, build {} ms",
        built.elapsed().as_millis()
    );
    archive
}

/// buildah on the storage of the test's own.
struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "overlay"])
            // Where buildah keeps the Dockerfile's cache mounts (and its temporary files).
            .env("TMPDIR", self.dir.join("tmp"));
        cmd
    }

    /// A Debian bookworm image of `packages` (plus rustup and the toolchain at `rust`, if
    /// given), named by its inputs; built with mmdebstrap unless the storage has it.
    fn base(&self, name: &str, packages: &[&str], rust: Option<&Toolchain>) -> String {
        let mut hasher = DefaultHasher::new();
        (MIRRORS, packages, rust.map(|r| &r.version)).hash(&mut hasher);
        let image = format!("faultd-test.local/{name}:{:016x}", hasher.finish());
        let known = output(self.command().args(["inspect", "--type", "image", &image]));
        if known.status.success() {
            return image;
        }
        let tarball = self.dir.join(format!("{name}.tar"));
        remove_file(&tarball);
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--variant=minbase", "--mode=root", "--quiet"]);
        if !packages.is_empty() {
            cmd.arg(format!("--include={}", packages.join(",")));
        }
        cmd.arg("bookworm").arg(&tarball).args(MIRRORS);
        run_ok(&mut cmd);

        let container = self.stdout(self.command().args(["from", "scratch"]));
        let finish = || -> Result<(), String> {
            self.try_run(
                self.command()
                    .arg("add")
                    .arg(&container)
                    .arg(&tarball)
                    .arg("/"),
            )?;
            if let Some(rust) = rust {
                self.add_rust(&container, rust)?;
            }
            self.try_run(self.command().args(["commit", "--rm", &container, &image]))
        };
        let result = finish();
        remove_file(&tarball);
        if let Err(e) = result {
            self.warn_unless_ok(self.command().args(["rm", &container]));
            panic!("building the base image {image}: {e}");
        }
        image
    }

    /// rustup and the toolchain as `rust:1.95-bookworm` has them: `RUSTUP_HOME=/usr/local/rustup`,
    /// `CARGO_HOME=/usr/local/cargo` with the proxies on PATH, the toolchain the default. The
    /// toolchain's documentation stays out (it is most of its size).
    fn add_rust(&self, container: &str, rust: &Toolchain) -> Result<(), String> {
        let toolchain = format!("/usr/local/rustup/toolchains/{}", rust.name);
        for part in ["bin", "lib", "libexec", "etc"] {
            let from = rust.dir.join(part);
            if from.exists() {
                self.try_run(
                    self.command()
                        .arg("copy")
                        .arg(container)
                        .arg(&from)
                        .arg(format!("{toolchain}/{part}")),
                )?;
            }
        }
        self.try_run(
            self.command()
                .arg("copy")
                .arg(container)
                .arg(&rust.rustup)
                .arg("/usr/local/cargo/bin/rustup"),
        )?;
        let settings = format!(
            "version = \"12\"\ndefault_toolchain = \"{}\"\nprofile = \"minimal\"\n\
             auto_self_update = \"disable\"\n",
            rust.name
        );
        let script = format!(
            "cd /usr/local/cargo/bin && for p in cargo rustc rustdoc; do ln -s rustup $p; done \
             && printf '%s' '{settings}' > /usr/local/rustup/settings.toml"
        );
        self.try_run(self.command().args([
            "run",
            "--isolation",
            "chroot",
            container,
            "--",
            "sh",
            "-c",
            &script,
        ]))?;
        self.try_run(self.command().args([
            "config",
            "--env",
            "RUSTUP_HOME=/usr/local/rustup",
            "--env",
            "CARGO_HOME=/usr/local/cargo",
            "--env",
            "PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            container,
        ]))
    }

    /// The id of `image` in the storage; empty if it has none.
    fn image_id(&self, image: &str) -> String {
        let out = output(
            self.command()
                .args(["images", "--quiet", "--no-trunc", image]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn warn_unless_ok(&self, cmd: &mut Command) {
        if let Err(e) = self.try_run(cmd) {
            eprintln!("warning: {e}");
        }
    }

    fn try_run(&self, cmd: &mut Command) -> Result<(), String> {
        let out = output(cmd);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{}` failed ({}): {}",
                crate::process::describe(cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn stdout(&self, cmd: &mut Command) -> String {
        String::from_utf8_lossy(&run_ok(cmd).stdout)
            .trim()
            .to_owned()
    }
}

/// The host's rustup toolchain of the Dockerfile's Rust release.
struct Toolchain {
    /// Its directory name under `toolchains/` (`1.95.0-x86_64-unknown-linux-gnu`).
    name: String,
    dir: PathBuf,
    /// `rustc -vV` of it: what the base image is keyed by.
    version: String,
    rustup: PathBuf,
}

fn rust_toolchain() -> Toolchain {
    let rustc = |args: &[&str]| {
        let out = run_ok(Command::new("rustc").args(args));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let version = rustc(&["-vV"]);
    let release = version
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or_else(|| panic!("no release in `rustc -vV`: {version}"))
        .to_owned();
    assert!(
        release.starts_with(&format!("{RUST_RELEASE}.")),
        "the Dockerfile builds with Rust {RUST_RELEASE} (rust:{RUST_RELEASE}-bookworm); the \
         host's rustup toolchain, which stands in for it offline, is {release}"
    );
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("a host in `rustc -vV`")
        .to_owned();
    let dir = PathBuf::from(rustc(&["--print", "sysroot"]));
    let rustup = which("rustup");
    Toolchain {
        name: format!("{release}-{host}"),
        dir,
        version,
        rustup,
    }
}

/// `name` on PATH, its symlinks resolved.
fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        panic!("removing {}: {e}", path.display());
    }
}

/// An exclusive flock on a file: one build at a time in the shared storage.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Lock {
        let file =
            File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        // SAFETY: flock on a descriptor this File owns; released when it closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert!(
            rc == 0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Lock { _file: file }
    }
}
