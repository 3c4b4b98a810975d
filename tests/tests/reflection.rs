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
