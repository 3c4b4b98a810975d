//! Any stock gRPC client works on faultd's unix socket with its defaults, whatever `:authority`
//! it sends: grpcurl 1.8.6 (`-unix`, the real binary), Python grpcio and Node grpc-js with a
//! default channel, and faultctl all see the same answers. README.md's grpcurl examples run as
//! they are written.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultd_tests::faultd::CliOutput;
use faultd_tests::{Cgroup, Faultctl, Faultd};
use serde_json::Value;

/// The test venv's bin directory, where `cargo xtask setup` installs grpcurl and grpcio.
fn venv_bin() -> PathBuf {
    faultd_tests::clients::venv_bin(&["grpcurl", "python3"])
}

/// `grpcurl -plaintext -unix SOCKET ARGS` (a verb such as `list`), as a user types it.
fn grpcurl(faultd: &Faultd, args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(venv_bin().join("grpcurl"));
    cmd.args(["-plaintext", "-unix"])
        .arg(faultd.socket())
        .args(args);
    CliOutput::of(&mut cmd)
}

/// grpcurl with `-d BODY` for `method`.
fn grpcurl_call(faultd: &Faultd, method: &str, body: &str) -> CliOutput {
    let mut cmd = Command::new(venv_bin().join("grpcurl"));
    cmd.args(["-plaintext", "-unix", "-d", body])
        .arg(faultd.socket())
        .arg(method);
    CliOutput::of(&mut cmd)
}

/// Python grpcio, a default channel (tests/clients/reflect_call.py).
fn python_call(faultd: &Faultd, method: &str, body: &str) -> CliOutput {
    let mut cmd = Command::new(venv_bin().join("python3"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/reflect_call.py"
    ))
    .arg(faultd.socket())
    .args(["call", method, body]);
    CliOutput::of(&mut cmd)
}

/// Node @grpc/grpc-js, a default channel (tests/clients/grpc_js_call.js).
fn node_call(faultd: &Faultd, method: &str, body: &str) -> CliOutput {
    let modules = std::env::var_os("FAULTD_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/test-node/node_modules"
            ))
        });
    assert!(
        modules.join("@grpc/grpc-js").is_dir(),
        "@grpc/grpc-js is not in {}: `cargo xtask setup` installs it",
        modules.display()
    );
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", &modules)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/grpc_js_call.js"
        ))
        .arg(faultd.socket())
        .args([method, body]);
    CliOutput::of(&mut cmd)
}

/// The ids and states of the faults in a List answer (proto3 JSON, any client's spelling).
fn listed(list: &Value) -> Vec<(String, String, String)> {
    let mut faults: Vec<_> = list["faults"]
        .as_array()
        .map(|faults| {
            faults
                .iter()
                .map(|f| {
                    (
                        f["id"].as_str().unwrap_or_default().to_string(),
                        f["leaseId"].as_str().unwrap_or_default().to_string(),
                        f["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    faults.sort();
    faults
}

fn drop_request(cgroup: &Cgroup, port: u16) -> String {
    format!(
        r#"{{"ttl":"60s","fault":{{"drop":{{"percent":100}},"labels":{{"client":"stock"}},
            "target":{{"cgroup":{{"path":"{}"}},"ports":[{{"first":{port}}}],
            "protocol":"TCP","direction":"EGRESS"}}}}}}"#,
        cgroup.path()
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn every_stock_client_works_with_its_defaults_and_sees_the_same_answers() {
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let faultctl = Faultctl::new(&faultd);
    faultd_tests::process::blocking(|| {
        // grpcurl: reflection (list, describe), then the API by JSON.
        let services = grpcurl(&faultd, &["list"]);
        assert!(services.success(), "grpcurl -unix list: {services}");
        for service in ["faultd.v1.FaultService", "faultd.v1.LeaseService"] {
            assert!(
                services.stdout().lines().any(|l| l == service),
                "grpcurl list shows no {service}: {services}"
            );
        }
        let described = grpcurl(&faultd, &["describe", "faultd.v1.FaultService"]);
        assert!(
            described.success() && described.stdout().contains("rpc Inject"),
            "grpcurl describe: {described}"
        );
        let first = grpcurl_call(
            &faultd,
            "faultd.v1.FaultService/Inject",
            &drop_request(&cgroup, 6379),
        )
        .json();
        assert_eq!(first["state"], "ACTIVE", "{first}");
        let first_id = first["id"].as_str().expect("an id").to_string();

        // Python grpcio injects the second; Node grpc-js reads them.
        let second = python_call(
            &faultd,
            "faultd.v1.FaultService/Inject",
            &drop_request(&cgroup, 6380),
        )
        .json();
        assert_eq!(second["state"], "ACTIVE", "{second}");
        let second_id = second["id"].as_str().expect("an id").to_string();

        // Every client lists the same faults.
        let from_grpcurl =
            listed(&grpcurl_call(&faultd, "faultd.v1.FaultService/List", "{}").json());
        let from_python = listed(&python_call(&faultd, "faultd.v1.FaultService/List", "{}").json());
        let from_node = listed(&node_call(&faultd, "faultd.v1.FaultService/List", "{}").json());
        let out = faultctl.run(&["--output", "json", "list"]);
        out.assert_success();
        let from_faultctl: Value = serde_json::from_str(&out.stdout()).expect("faultctl JSON");
        let from_faultctl = listed(&from_faultctl);
        assert_eq!(from_grpcurl.len(), 2, "{from_grpcurl:?}");
        let ids: Vec<&str> = from_grpcurl.iter().map(|f| f.0.as_str()).collect();
        assert!(ids.contains(&first_id.as_str()) && ids.contains(&second_id.as_str()));
        assert_eq!(from_python, from_grpcurl, "python and grpcurl disagree");
        assert_eq!(from_node, from_grpcurl, "node and grpcurl disagree");
        assert_eq!(from_faultctl, from_grpcurl, "faultctl and grpcurl disagree");

        // The same error, the same code, for each.
        let missing = r#"{"id":"0123456789abcdef"}"#;
        let grpcurl_missing = grpcurl_call(&faultd, "faultd.v1.FaultService/Get", missing);
        assert!(
            !grpcurl_missing.success() && grpcurl_missing.stderr().contains("Code: NotFound"),
            "{grpcurl_missing}"
        );
        for answer in [
            python_call(&faultd, "faultd.v1.FaultService/Get", missing),
            node_call(&faultd, "faultd.v1.FaultService/Get", missing),
        ] {
            assert!(
                !answer.success() && answer.stdout().starts_with("ERROR NOT_FOUND"),
                "{answer}"
            );
        }

        // Node removes the first; every client then reads it as ended, with its reason.
        let removed = node_call(
            &faultd,
            "faultd.v1.FaultService/Remove",
            &format!(r#"{{"id":"{first_id}"}}"#),
        )
        .json();
        assert_eq!(removed["state"], "REVERTED", "{removed}");
        let get = format!(r#"{{"id":"{first_id}"}}"#);
        for answer in [
            grpcurl_call(&faultd, "faultd.v1.FaultService/Get", &get),
            python_call(&faultd, "faultd.v1.FaultService/Get", &get),
            node_call(&faultd, "faultd.v1.FaultService/Get", &get),
        ] {
            let fault = answer.json();
            assert_eq!(fault["state"], "REVERTED", "{answer}");
            assert_eq!(fault["endReason"], "REMOVED", "{answer}");
        }
        // grpcurl removes the second.
        let removed = grpcurl_call(
            &faultd,
            "faultd.v1.FaultService/Remove",
            &format!(r#"{{"id":"{second_id}"}}"#),
        )
        .json();
        assert_eq!(removed["state"], "REVERTED", "{removed}");
        assert!(
            listed(&grpcurl_call(&faultd, "faultd.v1.FaultService/List", "{}").json()).is_empty()
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn grpcurl_holds_a_lease_over_a_keepalive_stream_fed_from_stdin() {
    let faultd = Faultd::start().await;
    faultd_tests::process::blocking(|| {
        let lease = grpcurl_call(&faultd, "faultd.v1.LeaseService/Grant", r#"{"ttl":"2s"}"#).json();
        let id = lease["id"].as_str().expect("a lease id").to_string();
        let granted = Instant::now();

        // One stream, a renewal a second, for 4 s: twice the ttl.
        let mut cmd = Command::new(venv_bin().join("grpcurl"));
        cmd.args(["-plaintext", "-unix", "-d", "@"])
            .arg(faultd.socket())
            .arg("faultd.v1.LeaseService/KeepAlive")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting grpcurl");
        let mut stdin = child.stdin.take().expect("grpcurl's stdin");
        for _ in 0..4 {
            writeln!(stdin, r#"{{"leaseId":"{id}"}}"#).expect("feeding grpcurl");
            stdin.flush().expect("feeding grpcurl");
            std::thread::sleep(Duration::from_secs(1));
        }
        let alive = grpcurl_call(
            &faultd,
            "faultd.v1.LeaseService/TimeToLive",
            &format!(r#"{{"leaseId":"{id}"}}"#),
        );
        assert!(
            alive.success(),
            "the lease renewed over the stream died after {:?} (ttl 2 s): {alive}",
            granted.elapsed()
        );
        drop(stdin);
        let out = child.wait_with_output().expect("grpcurl's output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "grpcurl KeepAlive failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers = stdout.matches(&format!(r#""id": "{id}""#)).count();
        assert_eq!(answers, 4, "4 renewals, 4 answers expected: {stdout}");

        // Without renewals the lease ends after its ttl.
        std::thread::sleep(Duration::from_millis(2500));
        let gone = grpcurl_call(
            &faultd,
            "faultd.v1.LeaseService/TimeToLive",
            &format!(r#"{{"leaseId":"{id}"}}"#),
        );
        assert!(
            !gone.success() && gone.stderr().contains("Code: NotFound"),
            "the lease outlived its ttl without renewals: {gone}"
        );
    });
}

/// README.md's sh blocks that run grpcurl, as they are written.
fn readme_grpcurl_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                if block.contains("grpcurl ") {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF and cgroup v2; `cargo xtask test` runs it as root"]
async fn the_readme_grpcurl_examples_run_as_written() {
    let faultd = Faultd::start().await;
    let cgroup = Cgroup::new();
    let blocks = readme_grpcurl_blocks();
    assert!(
        blocks.len() >= 2,
        "README.md should show grpcurl examples: {blocks:?}"
    );
    let socket = faultd.socket().display().to_string();
    let path_env = format!(
        "{}:{}",
        venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    faultd_tests::process::blocking(|| {
        for block in &blocks {
            // Only where it runs differs: this faultd's socket, this test's cgroup.
            let script = block.replace("/run/faultd/faultd.sock", &socket).replace(
                r#""path":"/app""#,
                &format!(r#""path":"{}""#, cgroup.path()),
            );
            let mut cmd = Command::new("bash");
            cmd.args(["-euo", "pipefail", "-c", &script])
                .env("PATH", &path_env)
                .stdin(Stdio::null());
            let answer = CliOutput::of(&mut cmd);
            assert!(answer.success(), "README block failed:\n{block}\n{answer}");
            if block.contains("FaultService/Inject") {
                assert!(
                    answer.stdout().contains("faultd.v1.FaultService")
                        && answer.stdout().contains(r#""state": "ACTIVE""#),
                    "README's list/Inject block: {answer}"
                );
            }
            if block.contains("KeepAlive") {
                // Three renewals answered on the stream, then the revoked lease.
                assert_eq!(
                    answer.stdout().matches(r#""ttl": "10s""#).count(),
                    4,
                    "README's KeepAlive block: {answer}"
                );
            }
        }
    });
    // The Inject of the example is in force on this test's cgroup; nothing else.
    let list = grpcurl_call(&faultd, "faultd.v1.FaultService/List", "{}").json();
    let faults = listed(&list);
    assert_eq!(faults.len(), 1, "{list}");
}
