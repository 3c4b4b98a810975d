//! A lease kept alive holds its fault; when the controller dies, the fault goes within one ttl.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use faultd_proto::v1::{Direction, Protocol};
use faultd_tests::api::{cgroup_target, drop_fault, grant, list_faults, under_lease};
use faultd_tests::process::{describe, signal, unix_ns, wait_timeout};
use faultd_tests::servers::REDIS_PORT;
use faultd_tests::workload::{Attempt, timeline};
use faultd_tests::{Faultctl, RedisScene, Workload, fd_keepalive, fd_probe};

const TTL: Duration = Duration::from_secs(1);
/// 3 × ttl: the fault must outlive several ttls while the lease is kept alive.
const HOLD: Duration = Duration::from_secs(3);
const AFTER_KILL: Duration = Duration::from_millis(2000);
const RECOVERY_BOUND_MS: f64 = 1100.0; // ttl + 100 ms

/// A child killed on drop (the controller under test).
struct Controller {
    child: Child,
    what: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        wait_timeout(&mut self.child, Duration::from_secs(5));
    }
}

impl Controller {
    /// `faultctl inject drop --cgroup PATH --port 6379 --ttl TTL --keepalive`, stdout piped.
    fn faultctl_keepalive(faultctl: &Faultctl, cgroup: &str, ttl: &str) -> Controller {
        let mut cmd = faultctl.command();
        cmd.args([
            "inject",
            "drop",
            "--cgroup",
            cgroup,
            "--port",
            &REDIS_PORT.to_string(),
        ])
        .args(["--ttl", ttl, "--keepalive"])
        .stdout(Stdio::piped());
        let what = describe(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        Controller { child, what }
    }

    /// Reads the first stdout line, waiting up to 10 s.
    fn first_line(&mut self) -> String {
        let stdout = self.child.stdout.take().expect("piped stdout");
        let (send, recv) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = send.send(reader.read_line(&mut line).map(|_| line));
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        match faultd_tests::process::blocking(|| recv.recv_timeout(Duration::from_secs(10))) {
            Ok(Ok(line)) if !line.is_empty() => line,
            other => {
                let status = self.child.try_wait();
                panic!(
                    "`{}` printed no first line within 10 s ({other:?}, status {status:?})",
                    self.what
                )
            }
        }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "`{}` exited while it should keep the lease alive: {status}",
                self.what
            );
        }
    }
}

/// Holds for HOLD with the controller alive, SIGKILLs it, and measures when Redis answers
/// again. Returns the recovery time in ms after the kill.
fn hold_then_kill(inside: &Workload, controller: &mut Controller) -> f64 {
    let probe = inside.tcp_probe(
        &format!("127.0.0.1:{REDIS_PORT}"),
        Duration::from_millis(5),
        Duration::from_millis(20),
        HOLD + Duration::from_millis(300) + AFTER_KILL,
    );
    // A real client too, across the hold: it must not get an answer.
    let client = {
        let inside = inside.clone();
        std::thread::spawn(move || inside.redis_ping())
    };
    faultd_tests::process::blocking(|| std::thread::sleep(HOLD + Duration::from_millis(300)));
    controller.assert_running();
    let killed_at = unix_ns();
    signal(controller.child.id(), libc::SIGKILL);
    let attempts: Vec<Attempt> = probe.finish();
    let run = faultd_tests::process::blocking(|| client.join()).expect("redis-cli thread");
    assert!(
        !run.answered(),
        "redis-cli inside the cgroup got an answer while the lease was kept alive: {run}"
    );

    let first = attempts.first().expect("attempts").at;
    assert!(
        killed_at - first >= HOLD.as_nanos() as i128,
        "the probe started only {:.0} ms before the kill; it must cover {HOLD:?} of hold",
        (killed_at - first) as f64 / 1e6
    );
    let early = timeline::ok_before(&attempts, killed_at);
    assert!(
        early.is_empty(),
        "a client inside the cgroup reached Redis {:.0} ms after the fault was injected, while the lease was kept alive \
         (ttl {TTL:?}): the keep-alive did not hold the fault",
        early
            .first()
            .map(|a| (a.at - first) as f64 / 1e6)
            .unwrap_or(0.0)
    );
    let first_ok = timeline::first_ok_after(&attempts, killed_at).unwrap_or_else(|| {
        panic!(
            "Redis was still unreachable {AFTER_KILL:?} after the controller was SIGKILLed (ttl {TTL:?}): \
             the fault outlived its lease"
        )
    });
    (first_ok.at - killed_at) as f64 / 1e6
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn faultctl_keepalive_holds_the_fault_until_faultctl_dies() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let faultctl = Faultctl::new(faultd);

    let mut controller = Controller::faultctl_keepalive(&faultctl, cgroup.path(), "1s");
    let line = controller.first_line();
    let held = list_faults(&mut faults).await;
    assert_eq!(
        held.len(),
        1,
        "after `{}`, faultd should hold one fault: {held:?}",
        controller.what
    );
    assert!(
        line.contains(&held[0].id),
        "faultctl's first line should name the fault it injected ({}), got {line:?}",
        held[0].id
    );

    let recovery_ms = hold_then_kill(inside, &mut controller);
    eprintln!("MEASURE keepalive_kill_recovery_ms={recovery_ms:.1}");
    assert!(
        recovery_ms <= RECOVERY_BOUND_MS,
        "after faultctl was SIGKILLed, Redis stayed unreachable for {recovery_ms:.1} ms; the fault should end \
         within ttl + 100 ms = {RECOVERY_BOUND_MS} ms"
    );
    let left_over = list_faults(&mut faults).await;
    assert!(
        left_over.is_empty(),
        "after the keep-alive stopped and the lease expired, List shows {left_over:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn keepalive_stream_holds_the_fault_until_its_holder_dies() {
    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;
    let mut faults = faultd.faults();
    let mut leases = faultd.leases();

    let lease = grant(&mut leases, TTL).await;
    let mut cmd = std::process::Command::new(fd_keepalive!());
    cmd.arg("--socket")
        .arg(faultd.socket())
        .args(["--lease", &lease.id, "--every", "250ms"])
        .stdout(Stdio::piped());
    let what = describe(&cmd);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let mut controller = Controller { child, what };
    // The first answer proves the stream is up before the fault depends on it.
    controller.first_line();
    let target = cgroup_target(cgroup, &[REDIS_PORT], Protocol::Tcp, Direction::Both);
    faults
        .inject(under_lease(drop_fault(100.0, target), &lease.id))
        .await
        .unwrap_or_else(|s| panic!("Inject under lease {} failed: {s:?}", lease.id));

    let recovery_ms = hold_then_kill(inside, &mut controller);
    eprintln!("MEASURE keepalive_stream_kill_recovery_ms={recovery_ms:.1}");
    assert!(
        recovery_ms <= RECOVERY_BOUND_MS,
        "after the KeepAlive holder was SIGKILLed, Redis stayed unreachable for {recovery_ms:.1} ms; the fault \
         should end within ttl + 100 ms = {RECOVERY_BOUND_MS} ms"
    );
    let left_over = list_faults(&mut faults).await;
    assert!(
        left_over.is_empty(),
        "after the keep-alive stopped and the lease expired, List shows {left_over:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn sigterm_reverts_at_once_while_a_keepalive_is_open() {
    let mut scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &mut scene;
    let faultctl = Faultctl::new(faultd);

    // A long ttl: if the revert waited for the lease, traffic would stay blocked for a minute.
    let mut controller = Controller::faultctl_keepalive(&faultctl, cgroup.path(), "60s");
    controller.first_line();
    let blocked = inside.redis_ping();
    assert!(
        !blocked.answered(),
        "the fault was not in force before SIGTERM: {blocked}"
    );

    let started = std::time::Instant::now();
    let status = faultd.terminate();
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "faultd should exit 0 on SIGTERM with a KeepAlive stream open, got {status:?}; its log:\n{}",
        faultd.log()
    );
    eprintln!(
        "MEASURE sigterm_with_keepalive_exit_ms={:.1}",
        took.as_secs_f64() * 1e3
    );
    assert!(
        took < Duration::from_secs(3),
        "faultd took {took:?} to stop on SIGTERM: an open KeepAlive stream held it up"
    );
    let after = inside.redis_ping();
    assert!(
        after.answered(),
        "after faultd stopped, redis-cli inside the cgroup still gets no answer: {after}"
    );
    let ended = faultd_tests::process::blocking(|| {
        wait_timeout(&mut controller.child, Duration::from_secs(3))
    });
    assert!(
        ended.is_some_and(|s| !s.success()),
        "faultctl --keepalive should stop with an error once faultd is gone, got {ended:?}"
    );
}
