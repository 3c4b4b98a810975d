//! grpcurl needs no .proto file: server reflection (v1 and v1alpha) lists the services, and the
//! standard health service reports SERVING.

use faultd_tests::Faultd;
use prost::Message;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

const SERVICES: [&str; 3] = [
    "faultd.v1.FaultService",
    "faultd.v1.LeaseService",
    "grpc.health.v1.Health",
];

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn reflection_lists_the_services_and_health_is_serving() {
    let faultd = Faultd::start().await;

    // v1
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(faultd.channel());
    let ask = |request| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = vec![
        ask(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ask(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "faultd.v1.FaultService".into(),
            ),
        ),
    ];
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap_or_else(|s| panic!("grpc.reflection.v1 ServerReflectionInfo failed: {s:?}"))
        .into_inner();
    let listed = answers
        .message()
        .await
        .expect("v1 list answer")
        .expect("v1 answered nothing");
    let names: Vec<String> = match listed.message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("grpc.reflection.v1 ListServices answered {other:?}"),
    };
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "reflection v1 lists {names:?}, without {service}"
        );
    }
    let file = answers
        .message()
        .await
        .expect("v1 file answer")
        .expect("v1 answered no file");
    let files = match file.message_response {
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) => {
            files.file_descriptor_proto
        }
        other => panic!(
            "grpc.reflection.v1 FileContainingSymbol(faultd.v1.FaultService) answered {other:?}"
        ),
    };
    let described = files.iter().any(|bytes| {
        prost_types::FileDescriptorProto::decode(bytes.as_slice()).is_ok_and(|f| {
            f.package() == "faultd.v1" && f.service.iter().any(|s| s.name() == "FaultService")
        })
    });
    assert!(
        described,
        "reflection v1 returned no file describing faultd.v1.FaultService ({} files)",
        files.len()
    );

    // v1alpha (grpcurl before 1.9 and many tools still ask this one)
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(faultd.channel());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap_or_else(|s| panic!("grpc.reflection.v1alpha ServerReflectionInfo failed: {s:?}"))
        .into_inner();
    let listed = answers
        .message()
        .await
        .expect("v1alpha list answer")
        .expect("v1alpha answered nothing");
    let names: Vec<String> = match listed.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("grpc.reflection.v1alpha ListServices answered {other:?}"),
    };
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "reflection v1alpha lists {names:?}, without {service}"
        );
    }

    // Health: the server as a whole.
    let health = HealthClient::new(faultd.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("grpc.health.v1.Health/Check failed: {s:?}"))
        .into_inner();
    assert_eq!(
        health.status(),
        ServingStatus::Serving,
        "grpc.health.v1 Check(\"\") answered {health:?}"
    );
}

/// Runs the reflection-only Python client (tests/clients/reflect_call.py) against `faultd`.
fn reflect_call(faultd: &Faultd, args: &[&str]) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/reflect_call.py");
    // `cargo xtask test` points this at the venv it installs grpcio into.
    let python = std::env::var_os("FAULTD_TEST_PYTHON").unwrap_or_else(|| "python3".into());
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).arg(faultd.socket()).args(args);
    let out = faultd_tests::process::output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() || stdout.starts_with("ERROR "),
        "`{}` failed without a gRPC status (is grpcio installed? `cargo xtask setup` installs it): {}\n{}",
        faultd_tests::process::describe(&cmd),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "privileged: needs root, BPF, cgroup v2 and network namespaces; `cargo xtask test` runs it as root"]
async fn a_client_without_the_proto_injects_a_fault_by_json() {
    use faultd_tests::servers::REDIS_PORT;
    use faultd_tests::{RedisScene, fd_probe};

    let scene = RedisScene::start(fd_probe!()).await;
    let RedisScene {
        cgroup,
        faultd,
        inside,
        ..
    } = &scene;

    let call = |args: &[&str]| {
        let faultd = &faultd;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        faultd_tests::process::blocking(|| reflect_call(faultd, &refs))
    };
    let (ok, listed) = call(&["list"]);
    assert!(ok, "listing services by reflection failed: {listed}");
    for service in SERVICES {
        assert!(
            listed.lines().any(|l| l == service),
            "grpcio reflection lists {listed:?}, without {service}"
        );
    }

    // The request a user types into grpcurl, as in the README.
    let inject = format!(
        r#"{{"ttl":"30s","fault":{{"drop":{{"percent":100}},"target":{{"cgroup":{{"path":"{}"}},
            "ports":[{{"first":{REDIS_PORT}}}],"protocol":"TCP","direction":"EGRESS"}}}}}}"#,
        cgroup.path()
    );
    let (ok, answer) = call(&["call", "faultd.v1.FaultService/Inject", &inject]);
    assert!(ok, "Inject by JSON failed: {answer}");
    let fault: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("Inject answered {answer:?}: {e}"));
    let id = fault["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {fault}"))
        .to_string();
    assert_eq!(fault["state"], "ACTIVE", "{fault}");
    let blocked = inside.redis_ping();
    assert!(
        !blocked.answered(),
        "the fault injected by JSON did not block Redis inside the cgroup: {blocked}"
    );

    let bad = inject.replace(r#""percent":100"#, r#""percent":150"#);
    let (ok, answer) = call(&["call", "faultd.v1.FaultService/Inject", &bad]);
    assert!(!ok, "percent 150 was accepted: {answer}");
    assert!(
        answer.starts_with("ERROR INVALID_ARGUMENT fault.drop.percent"),
        "a bad percent should be INVALID_ARGUMENT naming fault.drop.percent, got {answer:?}"
    );

    let (ok, answer) = call(&[
        "call",
        "faultd.v1.FaultService/Remove",
        &format!(r#"{{"id":"{id}"}}"#),
    ]);
    assert!(ok, "Remove by JSON failed: {answer}");
    let after = inside.redis_ping();
    assert!(
        after.answered(),
        "after Remove, redis-cli inside still gets no answer: {after}"
    );
}
