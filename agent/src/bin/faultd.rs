//! faultd: the per-node agent. Loads the datapath, serves the API on a unix socket (and, with
//! --listen, on TCP with mTLS), expires leases, serves metrics, writes the audit log, and
//! reverts everything on SIGINT/SIGTERM.

use std::fs::{self, File};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use faultd::api::{Listener, Services};
use faultd::audit::{AuditLog, Entry, Peer};
use faultd::caps::Capabilities;
use faultd::caps::Capability;
use faultd::config::{Config, LogFormat};
use faultd::dataplane::Shaper;
use faultd::dataplane::cgroup_skb::CgroupSkbDataplane;
use faultd::dataplane::nfqueue::{self, NfqueueShaper};
use faultd::engine::{Engine, EngineConfig};
use faultd::instance::Instance;
use faultd::policy::Policy;
use faultd::target::CgroupRoot;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
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
    // Whatever faultd creates is its own unless it says otherwise (the socket's mode is set
    // explicitly): a permissive umask must not open the state directory, its files or the
    // socket to others, not even for a moment.
    // SAFETY: umask(2) only sets this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    raise_nofile();
    let mut policy = policy(&config)?;
    let tls = tls_config(&config)?;
    let audit = audit_log(&config)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let kernel = Kernel::load(&config).await?;

    // Removed when `run` returns, whether faultd stops or fails to start.
    let (listener, _socket) = bind(&config.socket, config.socket_group.as_deref()).await?;
    share_state_dir_with_socket_group(&config)?;
    let tcp = match config.listen {
        Some(addr) => Some(listen_tcp(addr, tls.is_some()).await?),
        None => None,
    };
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(listen_metrics(addr).await?),
        None => None,
    };
    let own_ports: Vec<u16> = tcp
        .iter()
        .chain(&metrics_listener)
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect();
    policy.protect_own_ports(&own_ports);
    tracing::info!(policy = %policy.summary(), "policy");
    let engine = Engine::with_shapers(
        Box::new(kernel.dataplane),
        kernel.shapers,
        Box::new(kernel.cgroup_root),
        EngineConfig {
            policy,
            ended_retention: config.ended_retention,
        },
    );
    let claims = faultd::claims::Claims::open(&config.instances_dir, kernel.instance.id())
        .context("joining the faultd instances of this host (--instances-dir)")?;
    engine.share_host(claims);
    let _instance = kernel.instance;
    let caps = Arc::new(kernel.caps);
    let services = Services::new(engine.clone(), caps.clone()).with_audit(audit);

    let (stop_tx, stop_rx) = watch::channel(false);
    let expiry = tokio::spawn(
        engine
            .clone()
            .run_expiry(faultd::api::stopped(stop_rx.clone())),
    );
    tokio::spawn(
        engine
            .clone()
            .run_target_watch(faultd::api::stopped(stop_rx.clone())),
    );
    revert_on_signal(engine.clone(), services.calls.clone(), stop_tx)?;
    if let Some(listener) = metrics_listener {
        let endpoint = faultd::http::Endpoint {
            registry: Arc::new(engine.metrics().registry(engine.clone())),
            engine: engine.clone(),
            caps: caps.clone(),
        };
        tokio::spawn(faultd::http::serve(listener, endpoint, stop_rx.clone()));
    }
    let tcp_served = tcp.map(|listener| {
        let listener = Listener::Tcp { listener, tls };
        tokio::spawn(faultd::api::serve_on(
            services.clone(),
            listener,
            stop_rx.clone(),
        ))
    });
    tracing::info!(socket = %config.socket.display(), kernel = %caps.kernel_release, "faultd ready");
    let served = faultd::api::serve_on(services, Listener::Unix(listener), stop_rx).await;
    if let Some(task) = tcp_served {
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "serving the API on TCP"),
            Err(e) => tracing::error!(error = %e, "serving the API on TCP"),
            Ok(Ok(())) => {}
        }
    }
    close(&engine).await?;
    if let Err(e) = expiry.await {
        tracing::warn!(error = %e, "expiry task");
    }
    served.map_err(|e| anyhow::anyhow!("serving the API: {e}"))
}

/// The policy file (or the defaults) with the flags that override it.
fn policy(config: &Config) -> anyhow::Result<Policy> {
    let mut policy = match &config.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    };
    if let Some(max_ttl) = config.max_ttl {
        policy.max_ttl = max_ttl;
    }
    if config.allow_host_scope {
        policy.allow_host_scope = true;
    }
    Ok(policy)
}

fn audit_log(config: &Config) -> anyhow::Result<Option<Arc<AuditLog>>> {
    let Some(path) = &config.audit_log else {
        return Ok(None);
    };
    let log = AuditLog::open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))?;
    Ok(Some(Arc::new(log)))
}

/// What faultd holds of the kernel: the datapath, the shaping mechanisms, the cgroup root, and
/// what the probe found.
struct Kernel {
    dataplane: CgroupSkbDataplane,
    shapers: Vec<Box<dyn faultd::dataplane::Shaper>>,
    cgroup_root: CgroupRoot,
    caps: Capabilities,
    /// This agent's identity; its beacon must live as long as the process, or other agents
    /// take it for dead (sweeping its rules, ignoring its claims).
    instance: Instance,
}

impl Kernel {
    async fn load(config: &Config) -> anyhow::Result<Kernel> {
        let cgroup_root = match &config.cgroup_root {
            Some(path) => CgroupRoot::at(path),
            None => CgroupRoot::detect(),
        }
        .map_err(anyhow::Error::msg)?;
        // Nothing to sweep from a killed predecessor: links are fd-owned and nothing is pinned,
        // so the kernel detached its programs when its process died.
        let root = cgroup_root.path().to_path_buf();
        let dataplane = tokio::task::spawn_blocking(move || {
            CgroupSkbDataplane::load(faultd::EBPF_OBJECT, &root)
        })
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
        let host_lock = faultd::claims::lock_path(&config.instances_dir);
        let shapers = shapers(
            &instance,
            &cgroup_root,
            &config.state_dir,
            host_lock,
            &mut caps,
        )
        .await?;
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
        Ok(Kernel {
            dataplane,
            shapers,
            cgroup_root,
            caps,
            instance,
        })
    }
}

async fn listen_tcp(addr: std::net::SocketAddr, tls: bool) -> anyhow::Result<TcpListener> {
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --listen tcp://{addr}"))?;
    let bound = tcp.local_addr()?;
    if tls {
        tracing::info!(listen = %format!("tcp://{bound}"), "serving the API over mTLS");
    } else {
        tracing::warn!(
            listen = %format!("tcp://{bound}"),
            "serving the API over plain TCP without authentication (--insecure): anyone who reaches this port can cut any connection on this node"
        );
    }
    Ok(tcp)
}

async fn listen_metrics(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(metrics = %format!("http://{bound}/metrics"), health = %format!("http://{bound}/healthz"), "serving metrics");
    Ok(listener)
}

/// On SIGTERM or SIGINT: revert everything first (clients still connected must not keep
/// faults alive past the signal), write it to the audit log, then tell the servers to stop.
fn revert_on_signal(
    engine: Arc<Engine>,
    calls: faultd::api::Calls,
    stop: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        // On the blocking pool: reverting may run netlink and iptables-restore at length.
        let (faults, leases) = match tokio::task::spawn_blocking(move || engine.shutdown()).await {
            Ok(reverted) => reverted,
            Err(e) => {
                tracing::error!(error = %e, "reverting at {name}");
                (Vec::new(), Vec::new())
            }
        };
        tracing::info!(
            faults = faults.len(),
            leases = leases.len(),
            "{name}: reverted everything; stopping"
        );
        calls.audit(&Entry {
            call: "shutdown",
            peer: &Peer::Agent {
                cause: name.to_string(),
            },
            request: json!({}),
            code: "OK",
            message: "",
            result: json!({ "revertedFaultIds": faults, "revokedLeaseIds": leases }),
        });
        let _receivers_gone = stop.send(true);
    });
    Ok(())
}

/// Anything injected while connections drained goes too, and the mechanisms finish their
/// clean-up (netfilter rules) before faultd exits.
async fn close(engine: &Arc<Engine>) -> anyhow::Result<()> {
    let closing = engine.clone();
    let (faults, leases) = tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("reverting everything at the end")?;
    if !faults.is_empty() || !leases.is_empty() {
        tracing::info!(
            faults = faults.len(),
            leases = leases.len(),
            "reverted what came in while connections drained"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard one (systemd gives 1024 and 524288): every lease
/// stream, NFQUEUE lane, netlink socket and iptables pipe needs a descriptor, and nothing here
/// uses select(2). A failure is logged: faultd still runs within the soft limit.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit struct we own.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            Err(std::io::Error::last_os_error())
        } else if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        } else {
            Ok(())
        }
    };
    match raised {
        Ok(()) => tracing::debug!(nofile = limit.rlim_cur, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "raising RLIMIT_NOFILE to its hard limit"),
    }
}

/// The delay and bandwidth mechanisms, in the engine's order of preference, after probing the
/// kernel for each (reported in `caps`). NFQUEUE sweeps rules of dead agents as it starts.
async fn shapers(
    instance: &Instance,
    cgroup_root: &CgroupRoot,
    state_dir: &Path,
    host_lock: PathBuf,
    caps: &mut Capabilities,
) -> anyhow::Result<Vec<Box<dyn Shaper>>> {
    // netem and EDT: probed by building what they need (htb, a class, its netem or fq leaf)
    // on the loopback device of a private namespace; a killed predecessor's qdiscs and filters
    // are swept as the classifier loads.
    let (tc_shapers, found) =
        tokio::task::spawn_blocking(|| faultd::dataplane::tc::tc_shapers(faultd::EBPF_OBJECT))
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
    let nfqueue_works = probe
        .families
        .as_ref()
        .map(drop)
        .map_err(|_| probe.detail.clone());
    caps.items.push(Capability::outcome(
        "nfqueue",
        nfqueue_works.clone(),
        &probe.detail,
    ));
    // reject and reset on an interface refuse connects with REJECT rules put in by the NFQUEUE
    // mechanism's iptables-restore: available with it (xt_REJECT itself is not probed).
    caps.items.push(Capability::outcome(
        "netns_reject",
        nfqueue_works,
        "REJECT --reject-with tcp-reset rules on SYNs through the interface, for reject and reset \
         on netns{path, interface} scopes",
    ));
    let (id, root, dir) = (
        instance.id().to_owned(),
        cgroup_root.path().to_path_buf(),
        state_dir.to_path_buf(),
    );
    let nfqueue =
        tokio::task::spawn_blocking(move || NfqueueShaper::start(&id, &root, &dir, probe.families))
            .await?
            .context("starting the NFQUEUE mechanism")?
            .with_host_lock(host_lock);
    let mut shapers: Vec<Box<dyn Shaper>> = tc_shapers;
    shapers.push(Box::new(nfqueue));
    Ok(shapers)
}

/// Takes the state directory's lock, held for the life of the process. The directory is 0700
/// and its files 0600, also those an earlier faultd left under a permissive umask: a later
/// faultd trusts what it reads there (`nfqueue-netns`).
fn lock_state_dir(dir: &Path) -> anyhow::Result<File> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    // Made private below: never a shared directory such as /tmp, nor someone else's.
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.mode() & 0o1000 != 0 || meta.uid() != euid {
        bail!(
            "the state directory {} is shared (sticky bit) or belongs to uid {}: give faultd a \
             directory of its own with --state-dir",
            dir.display(),
            meta.uid()
        );
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    let path = dir.join("faultd.lock");
    let file = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another faultd uses the state directory {} (give this one its own --state-dir)",
            dir.display()
        );
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", entry.path().display()))?;
        }
    }
    fs::write(dir.join("faultd.pid"), std::process::id().to_string())?;
    Ok(file)
}

/// The mTLS configuration of --listen, or None for --insecure (or no --listen). Refuses
/// half-configured TLS, and plain TCP that was not asked for explicitly.
fn tls_config(config: &Config) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let files = [&config.tls_cert, &config.tls_key, &config.tls_client_ca];
    let given = files.iter().filter(|f| f.is_some()).count();
    let Some(addr) = config.listen else {
        if given > 0 || config.insecure {
            bail!(
                "--tls-cert, --tls-key, --tls-client-ca and --insecure are for --listen tcp://ADDR"
            );
        }
        return Ok(None);
    };
    match (config.insecure, given) {
        (true, 0) => return Ok(None),
        (true, _) => bail!(
            "--insecure serves plain TCP: drop --tls-cert, --tls-key and --tls-client-ca, or drop --insecure"
        ),
        (false, 3) => {}
        (false, _) => bail!(
            "--listen tcp://{addr} requires mTLS: give --tls-cert, --tls-key and --tls-client-ca \
             (a client CA, so only clients with a certificate it signed get in), or --insecure to \
             serve plain TCP anyway"
        ),
    }
    let read = |path: &Option<std::path::PathBuf>, flag: &str| -> anyhow::Result<Vec<u8>> {
        let path = path.as_ref().context("checked above")?;
        fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    let cert = read(&config.tls_cert, "--tls-cert")?;
    let key = read(&config.tls_key, "--tls-key")?;
    let ca = read(&config.tls_client_ca, "--tls-client-ca")?;
    Ok(Some(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false),
    ))
}

/// A group by name or number.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).context("--socket-group contains a NUL byte")?;
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call; getgrnam_r writes only into `entry` and
    // `buffer` (its length is passed) and sets `found` to `&entry` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("--socket-group {group}: no such group");
    }
    Ok(entry.gr_gid)
}

/// The default layout keeps the socket in the state directory (`/run/faultd`): then the
/// socket's group may traverse the directory to reach the socket (0710, that group), and do
/// nothing else there; without a socket group it stays 0700.
fn share_state_dir_with_socket_group(config: &Config) -> anyhow::Result<()> {
    let (Some(group), Some(parent)) = (config.socket_group.as_deref(), config.socket.parent())
    else {
        return Ok(());
    };
    let (Ok(socket_dir), Ok(state_dir)) = (fs::metadata(parent), fs::metadata(&config.state_dir))
    else {
        return Ok(());
    };
    if (socket_dir.dev(), socket_dir.ino()) != (state_dir.dev(), state_dir.ino()) {
        return Ok(());
    }
    let dir = &config.state_dir;
    std::os::unix::fs::chown(dir, None, Some(group_id(group)?))
        .with_context(|| format!("giving {} to group {group}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o710))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// The API socket's file, removed when dropped if it is still the one this faultd bound (a
/// failed start leaves no socket behind; a successor's socket is never touched).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(error = %e, "removing the socket");
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
}

/// Creates the socket's directory and any missing parents, 0755 each (the socket's group must
/// reach it; the umask is 077), leaving existing ones as they are.
fn create_socket_dir(dir: &Path) -> anyhow::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", d.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    Ok(())
}

/// A directory only this process can reach, next to `socket` (so the socket can be renamed out
/// of it), with a name nobody else holds.
fn private_dir(socket: &Path) -> anyhow::Result<PathBuf> {
    let parent = socket.parent().unwrap_or(Path::new("."));
    let mut last = None;
    for attempt in 0..16u32 {
        let dir = parent.join(format!(".faultd-bind-{}-{attempt}", std::process::id()));
        // mkdir never follows a symlink in the last component: an existing name is skipped.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no free name"), anyhow::Error::from))
        .with_context(|| format!("creating a private directory in {}", parent.display()))
}

/// Binds the API socket (mode 0660, owned by `group` if given), replacing a stale one but never
/// a live agent's. The socket is bound inside a private 0700 directory, given its owner and
/// mode there, and only then renamed into place: it is never reachable with another mode.
async fn bind(socket: &Path, group: Option<&str>) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(parent) = socket.parent() {
        create_socket_dir(parent)?;
    }
    if socket.exists() && tokio::net::UnixStream::connect(socket).await.is_ok() {
        bail!(
            "another faultd is serving on {} (stop it or pass --socket)",
            socket.display()
        );
    }
    let gid = group.map(group_id).transpose()?;
    let private = private_dir(socket)?;
    let staged = private.join("faultd.sock");
    let bound = (|| {
        let listener =
            UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
        if let (Some(gid), Some(group)) = (gid, group) {
            std::os::unix::fs::chown(&staged, None, Some(gid))
                .with_context(|| format!("giving {} to group {group}", socket.display()))?;
        }
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o660))?;
        // Replaces a stale socket in one step.
        fs::rename(&staged, socket).with_context(|| format!("placing {}", socket.display()))?;
        let meta = fs::symlink_metadata(socket)?;
        anyhow::Ok((
            listener,
            SocketFile {
                path: socket.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        ))
    })();
    if bound.is_err() {
        // Whatever was staged goes with the directory.
        if let Err(e) = fs::remove_file(&staged)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "removing {}", staged.display());
        }
    }
    fs::remove_dir(&private).with_context(|| format!("removing {}", private.display()))?;
    bound
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
