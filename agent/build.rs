//! Builds the eBPF object with aya-build and Debian's rustc (see TOOLCHAIN.md). Without that
//! toolchain it writes an empty stub object so `cargo check`/`clippy` work; faultd refuses to
//! start when it was built with the stub.
use std::{env, fs, path::PathBuf};

const EBPF_PACKAGE: &str = "faultd-ebpf";
const EBPF_TOOLCHAIN: &str = "/usr";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("agent-ebpf");
    let linker = find_on_path("bpf-linker");
    let core_lib = PathBuf::from(EBPF_TOOLCHAIN).join("lib/rustlib/bpfel-unknown-none/lib");
    let debian_cargo = PathBuf::from(EBPF_TOOLCHAIN).join("bin/cargo");
    println!("cargo:rerun-if-env-changed=FAULTD_EBPF_STUB");

    let missing: Vec<String> = [
        (linker.is_none(), "bpf-linker".to_string()),
        (!core_lib.is_dir(), core_lib.display().to_string()),
        (!debian_cargo.is_file(), debian_cargo.display().to_string()),
    ]
    .into_iter()
    .filter_map(|(missing, what)| missing.then_some(what))
    .collect();

    if missing.is_empty() && env::var_os("FAULTD_EBPF_STUB").is_none() {
        let root = ebpf_dir.to_string_lossy().into_owned();
        // aya-build relays the nested cargo's stderr as cargo:warning lines: keep only what
        // matters (errors and compiler warnings), not its progress lines.
        // SAFETY: the build script is single-threaded here.
        unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
        aya_build::build_ebpf(
            [aya_build::Package {
                name: EBPF_PACKAGE,
                root_dir: &root,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
        )?;
        println!("cargo:rustc-cfg=faultd_ebpf_built");
    } else {
        println!(
            "cargo:warning=eBPF toolchain missing ({}): building with an empty stub object; \
             run `cargo xtask setup`",
            missing.join(", ")
        );
        fs::write(out_dir.join(EBPF_PACKAGE), [])?;
        // Rebuild once the toolchain appears.
        println!("cargo:rerun-if-changed={}", core_lib.display());
        println!("cargo:rerun-if-changed={}", ebpf_dir.display());
        if let Some(home) = env::var_os("HOME") {
            println!(
                "cargo:rerun-if-changed={}",
                PathBuf::from(home).join(".cargo/bin/bpf-linker").display()
            );
        }
    }
    println!("cargo:rustc-check-cfg=cfg(faultd_ebpf_built)");
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
