//! Request matches on the guest's kernel, so the payload parser passes each kernel's verifier
//! and matches there: the guest has no Redis, so a small RESP server of its own answers every
//! command with `+OK` and logs the names of the commands it ran; a client in the faulted cgroup
//! sends commands one by one and reports how each went.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use faultd_proto::v1::{
    Direction, Fault, Protocol, RedisMatch, RequestMatch, request_match::Protocol as Matched,
};
use faultd_tests::api::{cgroup_target, drop_fault, reset_fault, with_ttl};
use faultd_tests::{Cgroup, Faultd};

pub const RESP_PORT: u16 = 7002;

/// The command names the RESP server ran, in order.
static RAN: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn ran() -> Vec<String> {
    RAN.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Answers each multibulk request with `+OK` and logs its command name.
pub fn resp_server() -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", RESP_PORT))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // One request per segment: the client waits for each answer.
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Some(name) = text.split("\r\n").nth(2) {
                        RAN.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(name.to_uppercase());
                    }
                    if stream.write_all(b"+OK\r\n").is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// `resp CGROUP_DIR PORT CMD[:ARG...]...`: joins the cgroup, sends each command as RESP over
/// one connection, and prints `NAME ok`, `NAME timeout` or `NAME error KIND MS` per command.
pub fn resp_client(args: &[String]) -> anyhow::Result<()> {
    let [cgroup, port, commands @ ..] = args else {
        bail!("usage: resp CGROUP_DIR PORT CMD[:ARG...]...");
    };
    crate::clients::join_cgroup(cgroup)?;
    let mut stream = TcpStream::connect(("127.0.0.1", port.parse::<u16>()?))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    for command in commands {
        let parts: Vec<&str> = command.split(':').collect();
        let mut request = format!("*{}\r\n", parts.len());
        for part in &parts {
            request += &format!("${}\r\n{part}\r\n", part.len());
        }
        let started = Instant::now();
        let mut reply = [0u8; 5];
        let outcome = stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.read_exact(&mut reply));
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match outcome {
            Ok(()) => println!("{} ok", parts[0]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                println!("{} timeout", parts[0])
            }
            Err(e) => {
                println!("{} error {:?} {ms:.1}", parts[0], e.kind());
                break;
            }
        }
    }
    Ok(())
}

fn client(cgroup: &Path, commands: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new(std::env::current_exe()?)
        .arg("resp")
        .arg(cgroup)
        .arg(RESP_PORT.to_string())
        .args(commands)
        .output()?;
    ensure!(
        out.status.success(),
        "resp client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    println!("guest:   {commands:?}: {lines:?}");
    Ok(lines)
}

fn target(cgroup: &Cgroup, command: &str) -> faultd_proto::v1::Target {
    let mut target = cgroup_target(cgroup, &[RESP_PORT], Protocol::Tcp, Direction::Egress);
    target.request = Some(RequestMatch {
        protocol: Some(Matched::Redis(RedisMatch {
            commands: vec![command.to_string()],
            key_prefix: String::new(),
        })),
    });
    target
}

async fn inject(faultd: &Faultd, fault: Fault) -> anyhow::Result<Fault> {
    Ok(faultd
        .faults()
        .inject(with_ttl(fault, Duration::from_secs(60)))
        .await
        .map_err(|s| anyhow::anyhow!("Inject: {s:?}"))?
        .into_inner())
}

/// drop on SET: the GET before it answers, the SET times out and never runs.
pub async fn drop_command(cgroup_dir: &Path) -> anyhow::Result<()> {
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    inject(&faultd, drop_fault(100.0, target(&cgroup, "SET"))).await?;
    let lines = client(
        &cgroup_dir.join(cgroup.path().trim_start_matches('/')),
        &["GET:k", "SET:k:v"],
    )?;
    ensure!(
        lines == ["GET ok", "SET timeout"],
        "GET must answer and SET time out: {lines:?}"
    );
    let ran = ran();
    ensure!(
        ran.contains(&"GET".to_string()) && !ran.contains(&"SET".to_string()),
        "the server ran {ran:?}"
    );
    Ok(())
}

/// reset on EVAL: the PING before it answers, EVAL fails with a connection error at once and
/// never runs.
pub async fn reset_command(cgroup_dir: &Path) -> anyhow::Result<()> {
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let fault = inject(&faultd, reset_fault(target(&cgroup, "eval"), None)).await?;
    ensure!(
        fault.mechanism == "cgroup_skb+sock_diag",
        "mechanism {:?}",
        fault.mechanism
    );
    let lines = client(
        &cgroup_dir.join(cgroup.path().trim_start_matches('/')),
        &["PING", "EVAL:return 1:0"],
    )?;
    ensure!(
        lines.len() == 2 && lines[0] == "PING ok" && lines[1].starts_with("EVAL error"),
        "PING must answer and EVAL fail with a connection error: {lines:?}"
    );
    ensure!(
        !ran().contains(&"EVAL".to_string()),
        "the server ran EVAL: {:?}",
        ran()
    );
    Ok(())
}
