//! gRPC server reflection: what `grpcurl -plaintext HOST list` and
//! `grpcurl ... describe` do, done with tonic-reflection's client (grpcurl is
//! not packaged for Debian and no Go toolchain is available here): the
//! controller lists its services and serves the descriptors of their messages,
//! comments included, so any language's tools can call it without the .proto files.
#![allow(clippy::unwrap_used)]

use cohort_runtime::tls::{Bearer, ClientTls};
use cohort_tests::{Cluster, NodeSpec};
use prost::Message;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// One reflection request over the cluster's TLS, with `token` as the bearer
/// (grpcurl's `-cacert ca.crt -H "authorization: Bearer ..."`).
async fn try_ask(
    cluster: &Cluster,
    token: Option<&str>,
    request: MessageRequest,
) -> Result<ServerReflectionResponse, tonic::Status> {
    let tls = cluster.tls.as_ref().expect("the harness runs clusters with TLS");
    let endpoint = ClientTls { ca_pem: tls.ca_pem.clone(), identity: None }
        .apply(tonic::transport::Endpoint::from_shared(cluster.url.clone()).unwrap())
        .unwrap();
    let channel = endpoint.connect().await.unwrap();
    let mut client = ServerReflectionClient::with_interceptor(channel, Bearer::new(token).unwrap());
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await?.into_inner();
    Ok(stream.message().await?.unwrap())
}

async fn ask(cluster: &Cluster, request: MessageRequest) -> ServerReflectionResponse {
    let token = cluster.tls.as_ref().map(|t| t.token(cohort_runtime::tls::Role::View, "reader"));
    try_ask(cluster, token.as_deref(), request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_and_describes_their_messages() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    // Reflection serves the schema to any token holder, nobody else.
    let refused = try_ask(&cluster, None, MessageRequest::ListServices(String::new())).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let listed = ask(&cluster, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else { panic!("{listed:?}") };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cohort.v1.AgentService",
            "cohort.v1.JobService",
            "cohort.v1.SecurityService",
            "grpc.reflection.v1.ServerReflection"
        ]
    );

    // `grpcurl describe cohort.v1.JobService`: the file that defines it, with its comments.
    let described = ask(&cluster, MessageRequest::FileContainingSymbol("cohort.v1.JobService".into())).await;
    let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response else {
        panic!("{described:?}")
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let job = files.iter().find(|f| f.name() == "cohort/v1/job.proto").unwrap();
    let service = job.service.iter().find(|s| s.name() == "JobService").unwrap();
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    for method in ["SubmitJob", "WatchJob", "GetMetrics", "GetReport", "ListConversionCache"] {
        assert!(methods.contains(&method), "{methods:?}");
    }
    let stage = job.message_type.iter().find(|m| m.name() == "PipelineStage").unwrap();
    assert!(stage.field.iter().any(|f| f.name() == "output"));
    assert!(job.source_code_info.is_some(), "comments travel with the descriptors");
}
