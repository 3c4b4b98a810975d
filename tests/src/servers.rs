//! Redis and PostgreSQL servers inside a test's network namespace, on their real ports.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::netns::NetNs;
use crate::process::{ChildGuard, describe, output, poll, run_ok, stop};
use crate::tempdir::TempDir;

pub const REDIS_PORT: u16 = 6379;
pub const POSTGRES_PORT: u16 = 5432;
/// PostgreSQL 15 as Debian installs it.
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

const START_TIMEOUT: Duration = Duration::from_secs(15);

fn log_file(path: &std::path::Path) -> (Stdio, Stdio) {
    let file = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let copy = file
        .try_clone()
        .unwrap_or_else(|e| panic!("dup {}: {e}", path.display()));
    (Stdio::from(file), Stdio::from(copy))
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// `redis-server` on 127.0.0.1:6379 and [::1]:6379 in the namespace, without persistence.
pub struct Redis {
    // Field order is drop order: the server stops before its directory goes.
    server: ChildGuard,
    dir: TempDir,
}

impl Redis {
    pub fn start(ns: &NetNs) -> Redis {
        Redis::start_bound(ns, &["127.0.0.1", "::1"])
    }

    /// `redis-server` on port 6379 of these addresses of the namespace (the first answers the
    /// readiness PING).
    pub fn start_bound(ns: &NetNs, binds: &[&str]) -> Redis {
        let dir = TempDir::new("faultd-test-redis");
        let log = dir.join("redis.log");
        let (stdout, stderr) = log_file(&log);
        let mut cmd = ns.exec("redis-server");
        cmd.args(["--port", &REDIS_PORT.to_string(), "--bind"])
            .args(binds)
            // Clients in other namespaces (routed to it) are let in: the namespace is the test's.
            .args(["--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let mut server = ChildGuard::spawn("redis-server", &mut cmd);
        let mut ping = ns.exec("redis-cli");
        ping.args(["-h", binds[0], "-p", &REDIS_PORT.to_string(), "PING"]);
        let ready = poll(START_TIMEOUT, || {
            server.assert_running(|| read_log(&log));
            let out = output(&mut ping);
            (String::from_utf8_lossy(&out.stdout).trim() == "PONG").then_some(())
        });
        assert!(
            ready.is_some(),
            "redis-server in netns {} did not answer `{}` within {START_TIMEOUT:?}; its log:\n{}",
            ns.name(),
            describe(&ping),
            read_log(&log)
        );
        Redis { server, dir }
    }

    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.join("redis.log"))
    }
}

/// A throw-away PostgreSQL 15 cluster (trust auth, fsync off) on 127.0.0.1:5432 in the namespace.
pub struct Postgres {
    server: Option<ChildGuard>,
    dir: TempDir,
}

impl Postgres {
    pub fn start(ns: &NetNs) -> Postgres {
        let dir = TempDir::new("faultd-test-pg");
        let (uid, gid) = postgres_user();
        // SAFETY: chown on a path we just created, with a NUL-terminated copy of it.
        let c_path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .expect("no NUL in path");
        assert_eq!(
            unsafe { libc::chown(c_path.as_ptr(), uid, gid) },
            0,
            "chown {} to postgres: {}",
            dir.path().display(),
            std::io::Error::last_os_error()
        );
        let data = dir.join("data");
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{POSTGRES_BIN}/initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "--no-instructions",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .current_dir(dir.path()),
        );

        let log = dir.join("postgres.log");
        let (stdout, stderr) = log_file(&log);
        // setpriv execs in place (runuser would fork), so the child we hold is the postmaster.
        let mut cmd = ns.exec("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(format!("{POSTGRES_BIN}/postgres"))
        .arg("-D")
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            &POSTGRES_PORT.to_string(),
            "-k",
        ])
        .arg(dir.path())
        .args(["-c", "fsync=off"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
        let server = ChildGuard::spawn("postgres", &mut cmd);
        let mut pg = Postgres {
            server: Some(server),
            dir,
        };

        let mut select = ns.exec("psql");
        select
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &POSTGRES_PORT.to_string(),
                "-U",
                "postgres",
                "-Atc",
                "select 1",
            ])
            .env("PGCONNECT_TIMEOUT", "2");
        let ready = poll(START_TIMEOUT, || {
            if let Some(server) = pg.server.as_mut() {
                server.assert_running(|| read_log(&log));
            }
            let out = output(&mut select);
            (String::from_utf8_lossy(&out.stdout).trim() == "1").then_some(())
        });
        assert!(
            ready.is_some(),
            "postgres in netns {} did not answer `{}` within {START_TIMEOUT:?}; its log:\n{}",
            ns.name(),
            describe(&select),
            read_log(&log)
        );
        pg
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.join("postgres.log"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // Immediate shutdown: the postmaster takes its backends with it. The guard then
            // SIGKILLs whatever is left; the namespace guard sweeps any straggler.
            stop(&mut server.child, libc::SIGQUIT, Duration::from_secs(5));
        }
    }
}

/// The host's postgres user: (uid, gid).
pub fn postgres_user() -> (libc::uid_t, libc::gid_t) {
    let out = run_ok(Command::new("id").args(["-u", "postgres"]));
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric uid");
    let out = run_ok(Command::new("id").args(["-g", "postgres"]));
    let gid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric gid");
    (uid, gid)
}
