//! faultd's TCP listener as an operator sets it up: mTLS with certificates made here, faultctl
//! over `--server tcp://`, clients without a good certificate refused, plain TCP only with an
//! explicit `--insecure` (and a warning), never by accident.

use std::process::Command;

use faultd_tests::faultd::binary;
use faultd_tests::pki::Pki;
use faultd_tests::{Cgroup, Faultctl, Faultd, FaultdOptions, TempDir};

fn path(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// faultctl pointed at faultd's TCP listener, with `tls` flags.
fn over_tcp(faultd: &Faultd, tls: &[String], args: &[&str]) -> faultd_tests::faultd::CliOutput {
    let listen = faultd
        .logged("listen")
        .unwrap_or_else(|| panic!("faultd logged no TCP listener:\n{}", faultd.log()));
    let mut all: Vec<String> = vec!["--server".into(), listen];
    all.extend(tls.iter().cloned());
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    Faultctl::new(faultd).run(&all)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn mtls_lets_in_clients_of_the_ca_and_refuses_the_rest() {
    let pki = Pki::new();
    let dir = TempDir::new("faultd-test-mtls");
    let audit = dir.join("audit.jsonl");
    let faultd = Faultd::start_with(FaultdOptions {
        extra_args: [
            pki.listener_args(),
            vec!["--audit-log".into(), path(&audit)],
        ]
        .concat(),
        ..FaultdOptions::default()
    })
    .await;
    let cgroup = Cgroup::new();
    let ca = vec!["--tls-ca".to_string(), path(&pki.ca)];
    let with = |cert: &std::path::Path, key: &std::path::Path| {
        let mut flags = ca.clone();
        flags.extend([
            "--tls-cert".into(),
            path(cert),
            "--tls-key".into(),
            path(key),
        ]);
        flags
    };
    let client = with(&pki.client_cert, &pki.client_key);

    // Accepted: the server certificate checks against 127.0.0.1, the client's against the CA.
    let run = over_tcp(
        &faultd,
        &client,
        &[
            "inject",
            "drop",
            "--cgroup",
            cgroup.path(),
            "--port",
            "6379",
            "--ttl",
            "30s",
        ],
    );
    run.assert_success();
    let run = over_tcp(&faultd, &client, &["list"]);
    run.assert_success();
    assert!(run.stdout().contains(cgroup.path()), "{run}");

    // Refused: no client certificate, one from another CA, and no TLS at all.
    let run = over_tcp(&faultd, &ca, &["abort"]);
    assert!(
        !run.success(),
        "a client without a certificate got in: {run}"
    );
    assert!(run.stderr().contains("refused this client"), "{run}");
    let run = over_tcp(
        &faultd,
        &with(&pki.stranger_cert, &pki.stranger_key),
        &["abort"],
    );
    assert!(
        !run.success(),
        "a client with a certificate of another CA got in: {run}"
    );
    assert!(run.stderr().contains("refused this client"), "{run}");
    let run = over_tcp(&faultd, &["--insecure".to_string()], &["abort"]);
    assert!(!run.success(), "a plain-TCP client got in: {run}");
    // faultctl itself will not talk TCP without TLS unless told to.
    let run = over_tcp(&faultd, &[], &["list"]);
    assert_eq!(run.output.status.code(), Some(2), "{run}");
    assert!(run.stderr().contains("--tls-ca"), "{run}");

    // The refused aborts changed nothing; the unix socket still serves.
    let run = Faultctl::new(&faultd).run(&["list"]);
    run.assert_success();
    assert!(
        run.stdout().contains(cgroup.path()),
        "the fault survived the refused aborts: {run}"
    );

    // The audit log names the certificate's subject for the TCP calls.
    let text = std::fs::read_to_string(&audit).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["call"], "faultd.v1.FaultService/Inject", "{text}");
    assert_eq!(first["peer"]["transport"], "mtls", "{text}");
    let subject = first["peer"]["subject"].as_str().unwrap();
    assert!(
        subject.contains(&format!("CN={}", pki.client_cn)),
        "the audit log should name the client certificate's subject: {subject}"
    );
    assert_eq!(
        text.lines().count(),
        1,
        "refused clients made no call: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn plain_tcp_needs_an_explicit_insecure() {
    let dir = TempDir::new("faultd-test-insecure");
    let out = Command::new(binary("FAULTD_BIN", "faultd"))
        .args(["--listen", "tcp://127.0.0.1:0", "--socket"])
        .arg(dir.join("s.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "faultd served plain TCP without --insecure: {stderr}"
    );
    assert!(
        stderr.contains("requires mTLS") && stderr.contains("--insecure"),
        "faultd should say what to give: {stderr}"
    );

    let faultd = Faultd::start_with(FaultdOptions {
        extra_args: vec![
            "--listen".into(),
            "tcp://127.0.0.1:0".into(),
            "--insecure".into(),
        ],
        ..FaultdOptions::default()
    })
    .await;
    let log = faultd.log();
    assert!(
        log.contains("WARN") && log.contains("without authentication"),
        "--insecure must be loud: {log}"
    );
    over_tcp(&faultd, &["--insecure".to_string()], &["caps"]).assert_success();
}
