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
use faultd::caps::Capability;
use faultd::config::{Config, LogFormat};
use faultd::dataplane::Shaper;
use faultd::dataplane::cgroup_skb::CgroupSkbDataplane;
use faultd::dataplane::nfqueue::{self, NfqueueShaper};
use faultd::engine::{Engine, EngineConfig};
use faultd::instance::Instance;
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
    let mut caps = Capabilities::probe(
        cgroup_root.path(),
        dataplane
            .as_ref()
            .map(|d| d as &dyn faultd::dataplane::Dataplane)
            .map_err(|e| e.to_string()),
    );
    let dataplane = dataplane.context("faultd cannot apply faults without its datapath")?;

    // What it leaves outside its process (netfilter chains) carries this id.
    let instance = Instance::register().context("registering this agent's instance id")?;
    fs::write(config.state_dir.join("instance"), instance.id())?;
    let shapers = shapers(&instance, &cgroup_root, &config.state_dir, &mut caps).await?;
    caps.add_shaping(&shapers);
    for c in &caps.items {
        tracing::info!(capability = c.name, available = c.available, detail = %c.detail, "probe");
    }
    for (action, mechanism) in &caps.actions {
        match mechanism {
            Ok(mechanism) => tracing::info!(action, mechanism, "action available"),
            Err(why) => tracing::warn!(action, %why, "action unavailable"),
        }
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

    // Anything injected while connections drained goes too, and the mechanisms finish their
    // clean-up (netfilter rules) before we exit.
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

/// The delay and bandwidth mechanisms, in the engine's order of preference, after probing the
/// kernel for each (reported in `caps`). NFQUEUE sweeps rules of dead agents as it starts.
async fn shapers(
    instance: &Instance,
    cgroup_root: &CgroupRoot,
    state_dir: &Path,
    caps: &mut Capabilities,
) -> anyhow::Result<Vec<Box<dyn Shaper>>> {
    // netem and EDT: probed by building what they need (htb, a class, its netem or fq leaf)
    // on the loopback device of a private namespace; a killed predecessor's qdiscs and filters
    // are swept as the classifier loads.
    let (tc_shapers, found) =
        tokio::task::spawn_blocking(|| faultd::dataplane::shape::tc_shapers(faultd::EBPF_OBJECT))
            .await?;
    for (name, outcome) in found {
        caps.items.push(Capability {
            name,
            available: outcome.is_ok(),
            detail: outcome.unwrap_or_else(|why| why),
        });
    }
    let id = instance.id().to_owned();
    let probe = tokio::task::spawn_blocking(move || nfqueue::probe(&id)).await?;
    caps.items.push(Capability::outcome(
        "nfqueue",
        probe
            .families
            .as_ref()
            .map(drop)
            .map_err(|_| probe.detail.clone()),
        &probe.detail,
    ));
    let (id, root, dir) = (
        instance.id().to_owned(),
        cgroup_root.path().to_path_buf(),
        state_dir.to_path_buf(),
    );
    let nfqueue =
        tokio::task::spawn_blocking(move || NfqueueShaper::start(&id, &root, &dir, probe.families))
            .await?
            .context("starting the NFQUEUE mechanism")?;
    let mut shapers: Vec<Box<dyn Shaper>> = tc_shapers;
    shapers.push(Box::new(nfqueue));
    Ok(shapers)
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
