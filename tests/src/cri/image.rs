//! The one container image the pod tests use, built locally with `umoci` (no registry): a
//! root holding `sleep` and the libraries it links, the merged-/usr symlinks and a passwd with
//! root and postgres. Its command, `sleep infinity`, makes it the sandbox ("pause") image;
//! workload containers bind-mount the host's `/usr` read-only over its own and run Redis,
//! PostgreSQL or the Python clients from there.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_ok;
use crate::tempdir::TempDir;

/// The name the image is imported under, as the sandbox image and the containers name it.
pub const IMAGE: &str = "faultd-test.local/pod";
/// umoci's tag inside the layout (the image is `IMAGE:TAG` once imported).
pub const TAG: &str = "v1";

/// Host files the image carries, at the same paths.
const BINARIES: &[&str] = &["/usr/bin/sleep"];

/// The OCI layout tarball under `target/cri-images/`, built unless one for the same inputs
/// (the binaries and libraries, the passwd lines, this file's layout) exists.
pub fn pod_image() -> PathBuf {
    let (passwd, group) = (host_entries("/etc/passwd"), host_entries("/etc/group"));
    build(&Recipe {
        name: "pod",
        files: image_files(BINARIES),
        links: Vec::new(),
        texts: vec![("etc/passwd".into(), passwd), ("etc/group".into(), group)],
        config: vec![
            "--config.cmd".into(),
            "/usr/bin/sleep".into(),
            "--config.cmd".into(),
            "infinity".into(),
        ],
    })
}

/// What an image holds and how it starts.
struct Recipe {
    /// The tarball's name prefix in the cache.
    name: &'static str,
    /// (host file, path in the image).
    files: Vec<(PathBuf, PathBuf)>,
    /// (path in the image, what the symlink points to).
    links: Vec<(PathBuf, String)>,
    /// (path in the image, relative; content).
    texts: Vec<(PathBuf, String)>,
    /// `umoci config` arguments.
    config: Vec<String>,
}

fn build(recipe: &Recipe) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    (TAG, &recipe.links, &recipe.texts, &recipe.config).hash(&mut hasher);
    for (source, dest) in &recipe.files {
        dest.hash(&mut hasher);
        std::fs::read(source)
            .unwrap_or_else(|e| panic!("reading {}: {e}", source.display()))
            .hash(&mut hasher);
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cri-images");
    let tarball = cache.join(format!("{}-{:016x}.tar", recipe.name, hasher.finish()));
    if tarball.is_file() {
        return tarball;
    }
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));

    let work = TempDir::new("faultd-test-image");
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let image = format!("{}:{TAG}", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &image]));
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    let root = bundle.join("rootfs");
    for dir in [
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
    ] {
        mkdir(&root.join(dir));
    }
    let tmp = root.join("tmp");
    mkdir(&tmp);
    set_mode(&tmp, 0o1777);
    for link in ["bin", "lib", "lib64", "sbin"] {
        let at = root.join(link);
        std::os::unix::fs::symlink(format!("usr/{link}"), &at)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", at.display()));
    }
    for (source, dest) in &recipe.files {
        let at = root.join(dest.strip_prefix("/").expect("absolute"));
        mkdir(at.parent().expect("a file has a parent"));
        std::fs::copy(source, &at)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", source.display(), at.display()));
    }
    for (dest, target) in &recipe.links {
        let at = root.join(dest.strip_prefix("/").expect("absolute"));
        mkdir(at.parent().expect("a link has a parent"));
        std::os::unix::fs::symlink(target, &at)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", at.display()));
    }
    for (dest, text) in &recipe.texts {
        write(&root.join(dest), text);
    }
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );
    run_ok(
        Command::new("umoci")
            .args(["config", "--image", &image])
            .args(&recipe.config),
    );
    let partial = cache.join(format!(
        "{}-{}.tar.partial",
        recipe.name,
        crate::uniq::uniq()
    ));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
    );
    std::fs::rename(&partial, &tarball).unwrap_or_else(|e| {
        panic!(
            "renaming {} to {}: {e}",
            partial.display(),
            tarball.display()
        )
    });
    // Older builds of the same image (faultd's changes with every build of the binaries).
    let prefix = format!("{}-", recipe.name);
    for entry in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix)
            && name.ends_with(".tar")
            && entry.path() != tarball
            && let Err(e) = std::fs::remove_file(entry.path())
        {
            eprintln!("warning: removing {}: {e}", entry.path().display());
        }
    }
    tarball
}

/// (host file, path in the image): each binary and every library `ldd` lists for it, placed
/// where the loader looks once `/lib`, `/lib64` are symlinks into `/usr`.
fn image_files(binaries: &[&str]) -> Vec<(PathBuf, PathBuf)> {
    let mut files = Vec::new();
    for binary in binaries {
        files.push((PathBuf::from(binary), PathBuf::from(binary)));
        add_libraries(&mut files, Path::new(binary));
    }
    files
}

/// Adds every library `ldd` lists for `binary` to `files`, once.
fn add_libraries(files: &mut Vec<(PathBuf, PathBuf)>, binary: &Path) {
    let out = run_ok(Command::new("ldd").arg(binary));
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if !word.starts_with('/') {
            continue;
        }
        let path = Path::new(word);
        let dir = path
            .parent()
            .and_then(|d| std::fs::canonicalize(d).ok())
            .unwrap_or_else(|| panic!("resolving the directory of {word}"));
        let dest = dir.join(path.file_name().expect("a library has a name"));
        if !files.iter().any(|(_, d)| *d == dest) {
            files.push((path.to_path_buf(), dest));
        }
    }
}

/// The root and postgres lines of a host database (`/etc/passwd`), so ids match the host's.
fn host_entries(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("root:") || l.starts_with("postgres:"))
        .collect();
    assert!(
        lines.len() == 2,
        "{path} should have root and postgres (the postgresql package creates it): {lines:?}"
    );
    lines.join("\n") + "\n"
}

fn mkdir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
