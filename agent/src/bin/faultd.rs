//! faultd: the per-node agent. Loads the datapath, serves the API on a unix socket, expires
//! leases, and reverts everything on SIGINT/SIGTERM.

use std::fs::{self, File};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use faultd::caps::Capabilities;
use faultd::config::{Config, LogFormat};
use faultd::dataplane::Dataplane;
use faultd::dataplane::cgroup_skb::CgroupSkbDataplane;
use faultd::engine::{Engine, EngineConfig};
use faultd::target::CgroupRoot;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_format);
    if let Err(e) = run(config).await {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let _lock = lock_state_dir(&config.state_dir)?;
    let cgroup_root = match &config.cgroup_root {
        Some(path) => CgroupRoot::at(path),
        None => CgroupRoot::detect(),
    }
    .map_err(anyhow::Error::msg)?;

    // Nothing to sweep from a killed predecessor: links are fd-owned and nothing is pinned, so
    // the kernel detached its programs when its process died.
    let root = cgroup_root.path().to_path_buf();
    let dataplane =
        tokio::task::spawn_blocking(move || CgroupSkbDataplane::load(faultd::EBPF_OBJECT, &root))
            .await
            .context("loading the datapath")?;
    let caps = Capabilities::probe(
        cgroup_root.path(),
        dataplane
            .as_ref()
            .map(|d| d.mechanism())
            .map_err(|e| e.to_string()),
    );
    for c in &caps.items {
        tracing::info!(capability = c.name, available = c.available, detail = %c.detail, "probe");
    }
    let dataplane = dataplane.context("faultd cannot apply faults without its datapath")?;
    // netem and EDT: probed by building their qdiscs in a private namespace; a killed
    // predecessor's qdiscs and filters are swept as the classifier loads.
    let (shapers, found) =
        tokio::task::spawn_blocking(|| faultd::dataplane::shape::tc_shapers(faultd::EBPF_OBJECT))
            .await?;
    let mut caps = caps;
    for (name, outcome) in found {
        let available = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|why| why);
        tracing::info!(capability = name, available, %detail, "probe");
        caps.items.push(faultd::caps::Capability {
            name,
            available,
            detail,
        });
    }

    let listener = bind(&config.socket).await?;
    let engine = Engine::with_shapers(
        Box::new(dataplane),
        shapers,
        Box::new(cgroup_root),
        EngineConfig {
            max_ttl: config.max_ttl,
        },
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let expiry = tokio::spawn(
        engine
            .clone()
            .run_expiry(faultd::api::stopped(stop_rx.clone())),
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let on_signal = engine.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        // Revert first: clients still connected must not keep faults alive past the signal.
        let (faults, leases) = on_signal.abort();
        tracing::info!(
            faults = faults.len(),
            leases = leases.len(),
            "{name}: reverted everything; stopping"
        );
        let _receivers_gone = stop_tx.send(true);
    });

    tracing::info!(socket = %config.socket.display(), kernel = %caps.kernel_release, "faultd ready");
    let served = faultd::api::serve(engine.clone(), Arc::new(caps), listener, stop_rx).await;

    // Anything injected while connections drained goes too, and the mechanisms remove what
    // they installed (qdiscs, filters).
    let (faults, leases) = engine.close();
    if !faults.is_empty() || !leases.is_empty() {
        tracing::info!(
            faults = faults.len(),
            leases = leases.len(),
            "reverted what came in while connections drained"
        );
    }
    tracing::info!("stopped");
    if let Err(e) = expiry.await {
        tracing::warn!(error = %e, "expiry task");
    }
    if let Err(e) = fs::remove_file(&config.socket) {
        tracing::warn!(error = %e, "removing the socket");
    }
    served.map_err(|e| anyhow::anyhow!("serving the API: {e}"))
}

/// Takes the state directory's lock, held for the life of the process.
fn lock_state_dir(dir: &Path) -> anyhow::Result<File> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = dir.join("faultd.lock");
    let file = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another faultd uses the state directory {} (give this one its own --state-dir)",
            dir.display()
        );
    }
    fs::write(dir.join("faultd.pid"), std::process::id().to_string())?;
    Ok(file)
}

/// Binds the API socket (mode 0660), replacing a stale one but never a live agent's.
async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = socket.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another faultd is serving on {} (stop it or pass --socket)",
                socket.display()
            );
        }
        fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
