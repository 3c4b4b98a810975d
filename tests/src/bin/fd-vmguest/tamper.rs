//! The kernel matrix's duplicate, corrupt and reorder tests: the guests have sch_netem, so
//! faultd applies them with netem (the host, without it, runs the NFQUEUE fallback in
//! tests/tests/tamper.rs; the duplicate is forced onto netem, which it takes only where NFQUEUE
//! is missing). A UDP sender in a cgroup (`fd-vmguest udp ...`) sends numbered
//! datagrams to a receiver outside it; the receiver counts them, their order, and the kernel's
//! UDP checksum errors.

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultd_proto::v1::fault::Action;
use faultd_proto::v1::{
    Corrupt, Delay, Direction, Duplicate, Fault, Mechanism, Protocol, RemoveRequest, Reorder,
};
use faultd_tests::api::{cgroup_target, with_ttl};
use faultd_tests::{Cgroup, Faultd};

/// Receiver ports, one per test (the echo and sink servers use 7000 and 7001).
const DUPLICATE_PORT: u16 = 7011;
const CORRUPT_PORT: u16 = 7012;
const REORDER_PORT: u16 = 7013;
/// How long the receiver waits for one more datagram before it stops counting.
const QUIET: Duration = Duration::from_millis(500);

/// `udp CGROUP_DIR PORT COUNT SIZE PAUSE_US`: joins the cgroup, then sends COUNT datagrams of
/// SIZE bytes (each starting with its number, u32 big-endian) to 127.0.0.1:PORT, PAUSE_US
/// microseconds apart.
pub fn udp_client(args: &[String]) -> anyhow::Result<()> {
    let [cgroup, port, count, size, pause] = args else {
        bail!("usage: udp CGROUP_DIR PORT COUNT SIZE PAUSE_US");
    };
    crate::clients::join_cgroup(cgroup)?;
    let port: u16 = port.parse()?;
    let count: u32 = count.parse()?;
    let size: usize = size.parse::<usize>()?.max(4);
    let pause = Duration::from_micros(pause.parse()?);
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let mut datagram = vec![0x5a; size];
    for i in 0..count {
        datagram[..4].copy_from_slice(&i.to_be_bytes());
        socket.send_to(&datagram, ("127.0.0.1", port))?;
        std::thread::sleep(pause);
    }
    Ok(())
}

/// What the receiver got: the numbers in arrival order.
struct Received {
    numbers: Vec<u32>,
}

impl Received {
    /// Datagrams that arrived after one with a higher number.
    fn late(&self) -> usize {
        let mut highest = None;
        let mut late = 0;
        for &n in &self.numbers {
            match highest {
                Some(h) if n < h => late += 1,
                _ => highest = Some(n),
            }
        }
        late
    }
}

/// Sends `count` datagrams of `size` bytes from inside `cgroup` to `port` and receives them
/// outside it, until nothing came for `QUIET`.
fn exchange(
    cgroup: &Cgroup,
    port: u16,
    count: u32,
    size: usize,
    pause_us: u64,
) -> anyhow::Result<Received> {
    let receiver = UdpSocket::bind(("127.0.0.1", port))?;
    receiver.set_read_timeout(Some(QUIET))?;
    let dir = super::cgroup_root().join(cgroup.path().trim_start_matches('/'));
    let mut sender = Command::new(std::env::current_exe()?)
        .arg("udp")
        .arg(&dir)
        .args([port.to_string(), count.to_string(), size.to_string()])
        .arg(pause_us.to_string())
        .spawn()?;
    let mut numbers = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let started = Instant::now();
    loop {
        match receiver.recv(&mut buf) {
            Ok(n) if n >= 4 => numbers.push(u32::from_be_bytes(buf[..4].try_into()?)),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                // Quiet: done once the sender is.
                if sender.try_wait()?.is_some() {
                    break;
                }
            }
            Err(e) => return Err(e.into()),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "still receiving after 60 s"
        );
    }
    let status = sender.wait()?;
    ensure!(status.success(), "the UDP sender failed: {status}");
    Ok(Received { numbers })
}

/// The kernel's UDP checksum errors (`Udp: InCsumErrors` in /proc/net/snmp).
fn udp_csum_errors() -> anyhow::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp")?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (
        udp.next().context("no Udp header")?,
        udp.next().context("no Udp values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .context("no InCsumErrors")?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .context("short Udp line")?
        .parse()?)
}

/// Injects `action` on the UDP datagrams the cgroup sends to `port`; checks netem applies it.
async fn inject(
    faultd: &Faultd,
    cgroup: &Cgroup,
    port: u16,
    action: Action,
) -> anyhow::Result<Fault> {
    let fault = try_inject(faultd, cgroup, port, action)
        .await
        .map_err(|s| anyhow::anyhow!("Inject: {s:?}"))?;
    ensure!(
        fault.mechanism == "netem",
        "mechanism {:?}, want \"netem\" (the guest kernels have sch_netem)",
        fault.mechanism
    );
    Ok(fault)
}

/// Inject's answer for `action` on the UDP datagrams the cgroup sends to `port`.
async fn try_inject(
    faultd: &Faultd,
    cgroup: &Cgroup,
    port: u16,
    action: Action,
) -> Result<Fault, tonic::Status> {
    let fault = Fault {
        action: Some(action),
        target: Some(cgroup_target(
            cgroup,
            &[port],
            Protocol::Udp,
            Direction::Egress,
        )),
        ..Default::default()
    };
    Ok(faultd
        .faults()
        .inject(with_ttl(fault, Duration::from_secs(120)))
        .await?
        .into_inner())
}

/// Removes the fault; prints its counters and checks it left no netem class behind.
async fn remove(faultd: &Faultd, id: &str) -> anyhow::Result<()> {
    let removed = faultd
        .faults()
        .remove(RemoveRequest { id: id.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("Remove: {s:?}"))?
        .into_inner();
    let c = removed.counters.unwrap_or_default();
    println!(
        "guest:   counters matched {} delayed {} duplicated {} corrupted {} reordered {}",
        c.matched, c.delayed, c.duplicated, c.corrupted, c.reordered
    );
    let qdiscs = Command::new("/usr/sbin/tc")
        .args(["qdisc", "show", "dev", "lo"])
        .output()?;
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    ensure!(!qdiscs.contains("netem"), "a netem left on lo:\n{qdiscs}");
    Ok(())
}

fn show_qdiscs() {
    if let Ok(out) = Command::new("/usr/sbin/tc")
        .args(["qdisc", "show", "dev", "lo"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        println!("guest:   {}", text.trim_end().replace('\n', "\nguest:   "));
    }
}

/// duplicate 100 %: the receiver counts every datagram twice.
pub async fn duplicate() -> anyhow::Result<()> {
    const COUNT: u32 = 200;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let baseline = exchange(&cgroup, DUPLICATE_PORT, COUNT, 200, 1000)?;
    ensure!(
        baseline.numbers.len() == COUNT as usize,
        "without the fault the receiver got {} of {COUNT}",
        baseline.numbers.len()
    );
    let fault = inject(&faultd, &cgroup, DUPLICATE_PORT, netem_duplicate()).await?;
    show_qdiscs();
    let received = exchange(&cgroup, DUPLICATE_PORT, COUNT, 200, 1000)?;
    remove(&faultd, &fault.id).await?;
    let mut each = vec![0u32; COUNT as usize];
    for &n in &received.numbers {
        each[n as usize] += 1;
    }
    let twice = each.iter().filter(|&&c| c == 2).count();
    println!(
        "guest:   sent {COUNT}, received {} ({twice} twice)",
        received.numbers.len()
    );
    ensure!(
        received.numbers.len() == 2 * COUNT as usize && twice == COUNT as usize,
        "duplicate 100%: the receiver got {} datagrams ({twice} of {COUNT} twice), want each twice",
        received.numbers.len()
    );
    let after = exchange(&cgroup, DUPLICATE_PORT, COUNT, 200, 1000)?;
    ensure!(
        after.numbers.len() == COUNT as usize,
        "after Remove the receiver got {} of {COUNT}",
        after.numbers.len()
    );
    Ok(())
}

/// corrupt 100 %: the receiver's UDP checksum errors rise by most of the datagrams sent (a
/// flip in the 28 bytes of headers of a 1028-byte packet is dropped otherwise), and those
/// never reach the socket.
pub async fn corrupt() -> anyhow::Result<()> {
    const COUNT: u32 = 200;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let action = Action::Corrupt(Corrupt {
        percent: 100.0,
        ..Default::default()
    });
    let fault = inject(&faultd, &cgroup, CORRUPT_PORT, action).await?;
    show_qdiscs();
    let before = udp_csum_errors()?;
    let received = exchange(&cgroup, CORRUPT_PORT, COUNT, 1000, 500)?;
    let errors = udp_csum_errors()? - before;
    remove(&faultd, &fault.id).await?;
    println!(
        "guest:   sent {COUNT}, received {}, UdpInCsumErrors +{errors}",
        received.numbers.len()
    );
    ensure!(
        errors >= u64::from(COUNT) * 8 / 10,
        "corrupt 100%: UdpInCsumErrors rose by {errors}, want at least 80% of {COUNT}"
    );
    ensure!(
        received.numbers.len() as u64 + errors <= u64::from(COUNT),
        "the receiver got {} datagrams besides {errors} checksum errors out of {COUNT}",
        received.numbers.len()
    );
    let after = exchange(&cgroup, CORRUPT_PORT, COUNT, 1000, 500)?;
    ensure!(
        after.numbers.len() == COUNT as usize,
        "after Remove the receiver got {} of {COUNT}",
        after.numbers.len()
    );
    Ok(())
}

/// reorder 50 % with a 20 ms gap, datagrams 2 ms apart: the held-back half arrives after later
/// ones, none is lost; in order before and after.
pub async fn reorder() -> anyhow::Result<()> {
    const COUNT: u32 = 200;
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let baseline = exchange(&cgroup, REORDER_PORT, COUNT, 200, 2000)?;
    ensure!(
        baseline.numbers.len() == COUNT as usize && baseline.late() == 0,
        "without the fault: {} of {COUNT} received, {} late",
        baseline.numbers.len(),
        baseline.late()
    );
    let action = Action::Reorder(Reorder {
        percent: 50.0,
        gap: Some(faultd::api::convert::duration_to_proto(
            Duration::from_millis(20),
        )),
        ..Default::default()
    });
    let fault = inject(&faultd, &cgroup, REORDER_PORT, action).await?;
    show_qdiscs();
    let received = exchange(&cgroup, REORDER_PORT, COUNT, 200, 2000)?;
    remove(&faultd, &fault.id).await?;
    let late = received.late();
    println!(
        "guest:   sent {COUNT}, received {}, {late} after a later one",
        received.numbers.len()
    );
    ensure!(
        received.numbers.len() == COUNT as usize,
        "reorder lost datagrams: {} of {COUNT}",
        received.numbers.len()
    );
    // Half are held back 20 ms while ten later ones leave at once: about 50 % late.
    ensure!(
        (COUNT as usize * 3 / 10..=COUNT as usize * 7 / 10).contains(&late),
        "reorder 50%: {late} of {COUNT} datagrams arrived after a later one, want about half"
    );
    let after = exchange(&cgroup, REORDER_PORT, COUNT, 200, 2000)?;
    ensure!(
        after.numbers.len() == COUNT as usize && after.late() == 0,
        "after Remove: {} of {COUNT} received, {} late",
        after.numbers.len(),
        after.late()
    );
    Ok(())
}

/// duplicate 100 % forced onto netem (auto takes NFQUEUE first).
fn netem_duplicate() -> Action {
    Action::Duplicate(Duplicate {
        percent: 100.0,
        mechanism: Mechanism::Netem as i32,
    })
}

/// A 10 ms delay on netem.
fn netem_delay() -> Action {
    Action::Delay(Delay {
        latency: Some(faultd::api::convert::duration_to_proto(
            Duration::from_millis(10),
        )),
        mechanism: Mechanism::Netem as i32,
        ..Default::default()
    })
}

/// The lines of `tc <what> show dev lo` that name `kind`.
fn count_tc(what: &str, kind: &str) -> anyhow::Result<usize> {
    let out = Command::new("/usr/sbin/tc")
        .args([what, "show", "dev", "lo"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(kind))
        .count())
}

fn netem_leaves() -> anyhow::Result<usize> {
    count_tc("qdisc", "netem")
}

/// A netem duplicate and a netem delay (of another cgroup) on the same interface, in both
/// orders (`duplicate_first`). Kernels that refuse the mix (5.10, 6.1) must answer the second
/// Inject with FAILED_PRECONDITION naming it and leave nothing of it (one netem leaf, the
/// datagrams arrive once); the others (6.12) apply both and the datagrams arrive twice. Never
/// INTERNAL. Then, after both are removed, no netem is left.
pub async fn duplicate_beside_delay(duplicate_first: bool) -> anyhow::Result<()> {
    const COUNT: u32 = 100;
    let faultd = Faultd::start().await;
    let (delayed, cgroup) = (Cgroup::new(), Cgroup::new());
    let delay_port = DUPLICATE_PORT + 10;
    let (first, second) = if duplicate_first {
        (
            try_inject(&faultd, &cgroup, DUPLICATE_PORT, netem_duplicate()).await,
            try_inject(&faultd, &delayed, delay_port, netem_delay()).await,
        )
    } else {
        (
            try_inject(&faultd, &delayed, delay_port, netem_delay()).await,
            try_inject(&faultd, &cgroup, DUPLICATE_PORT, netem_duplicate()).await,
        )
    };
    let first = first.map_err(|s| anyhow::anyhow!("first Inject: {s:?}"))?;
    show_qdiscs();
    let (leaves, classes) = (netem_leaves()?, count_tc("class", "htb")?);
    let received = exchange(&cgroup, DUPLICATE_PORT, COUNT, 200, 1000)?;
    let applied = match &second {
        Ok(_) => true,
        Err(status) => {
            println!(
                "guest:   second Inject: {:?} {}",
                status.code(),
                status.message()
            );
            ensure!(
                status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains("this kernel refuses")
                    && status.message().contains("duplicat"),
                "second Inject: {:?} {:?}, want FAILED_PRECONDITION naming the netem mix",
                status.code(),
                status.message()
            );
            false
        }
    };
    let want_copies = if applied || duplicate_first { 2 } else { 1 };
    let want_leaves = if applied { 2 } else { 1 };
    println!(
        "guest:   applied both: {applied}; netem leaves {leaves}, htb classes {classes}; sent {COUNT}, received {}",
        received.numbers.len()
    );
    faultd
        .faults()
        .remove(RemoveRequest {
            id: first.id.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("Remove: {s:?}"))?;
    if let Ok(second) = &second {
        remove(&faultd, &second.id).await?;
    }
    ensure!(netem_leaves()? == 0, "a netem left on lo after both faults");
    // One htb class per fault (and none of a refused one).
    ensure!(
        leaves == want_leaves && classes == want_leaves,
        "{leaves} netem leaves and {classes} htb classes on lo, want {want_leaves}"
    );
    ensure!(
        received.numbers.len() == want_copies * COUNT as usize,
        "the duplicated cgroup's receiver got {} of {COUNT} datagrams, want each {want_copies}×",
        received.numbers.len()
    );
    Ok(())
}
