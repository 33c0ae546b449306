//! A node name is one node's (issue 14, item 4): a second agent claiming a
//! connected node's name is refused, naming it, and the first keeps its
//! session and its job (TLS and `--insecure`); under TLS the name is bound to
//! the certificate it first joined with, and join tokens are single-use
//! unless made reusable, and revocable.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::security_service_client::SecurityServiceClient;
use cohort_proto::{
    CreateTokenRequest, JobState, JoinRequest, ListNodesRequest, NodeInfo, RegisterRequest, RevokeTokenRequest,
};
use cohort_runtime::tls::pki::node_csr;
use cohort_runtime::tls::{Bearer, Claims, ClientTls, ClusterCa, Role, files};
use cohort_tests::{Cluster, NodeSpec, state};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Node0 runs a job until released; a twin agent claims node0 from another
/// address; returns what the twin's log said.
async fn twin_is_refused(controller_args: &[&str]) -> String {
    let mut cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 1)], controller_args).await.unwrap();
    let (job, flag) = cluster.submit_held("held", 1).await.unwrap();

    let (_, twin_log) = cluster.start_twin_agent(0, "127.0.0.9").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let log = loop {
        let log = std::fs::read_to_string(&twin_log).unwrap_or_default();
        if log.contains("node0") && (log.contains("already connected") || log.contains("already joined")) {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "the twin agent was not refused:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Several of the twin's retries later: the first agent still holds node0, its job runs on.
    for _ in 0..30 {
        let now = cluster.job(&job.id).await.unwrap();
        assert_eq!(state(&now), JobState::Running, "{}; failure {:?}", now.reason, now.failure);
        assert_eq!((now.attempt, now.live_processes), (1, 1));
        let nodes = cluster.client().await.unwrap().list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let addresses: Vec<String> =
            nodes.iter().filter_map(|n| n.info.as_ref().map(|i| i.advertise_addr.clone())).collect();
        assert_eq!(addresses, ["127.0.0.2"], "node0's session moved to the twin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&flag, b"").unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}; failure {:?}", done.reason, done.failure);
    assert_eq!(done.attempt, 1);
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_with_a_connected_nodes_name_is_refused_without_tls() {
    let log = twin_is_refused(&["--insecure"]).await;
    assert!(log.contains("node node0 is already connected"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_with_a_joined_nodes_name_is_refused_with_tls() {
    // The cluster's join token is reusable, as a stolen one would be: the name is still taken.
    let log = twin_is_refused(&[]).await;
    assert!(log.contains("node node0 has already joined"), "{log}");
}

async fn channel(cluster: &Cluster, tls: &ClientTls) -> Channel {
    let endpoint = Endpoint::from_shared(cluster.controller_url(0)).unwrap().connect_timeout(Duration::from_secs(5));
    tls.apply(endpoint).unwrap().connect().await.unwrap()
}

async fn join(cluster: &Cluster, token: &str, name: &str) -> Result<(String, String), tonic::Status> {
    let tls = cluster.tls.as_ref().unwrap();
    let ch = channel(cluster, &ClientTls { ca_pem: tls.ca_pem.clone(), identity: None }).await;
    let (key, csr_pem) = node_csr(name).unwrap();
    let request = JoinRequest { token: token.into(), node_name: name.into(), csr_pem };
    let joined = SecurityServiceClient::new(ch).join(request).await?.into_inner();
    Ok((joined.cert_pem, key))
}

async fn register(cluster: &Cluster, identity: (String, String), name: &str) -> Result<(), tonic::Status> {
    let tls = cluster.tls.as_ref().unwrap();
    let ch = channel(cluster, &ClientTls { ca_pem: tls.ca_pem.clone(), identity: Some(identity) }).await;
    let node = NodeInfo { name: name.into(), advertise_addr: "127.0.0.9".into(), ..NodeInfo::default() };
    AgentServiceClient::new(ch).register(RegisterRequest { node: Some(node), ..Default::default() }).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_are_single_use_revocable_and_a_name_keeps_its_certificate() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();

    // Single-use: one node joins with it, a second is refused naming the first.
    let once = tls.token_key.mint(&Claims::new(Role::Join, "ops", Duration::from_secs(600)));
    let first = join(&cluster, &once, "gpu-01").await.unwrap();
    let refused = join(&cluster, &once, "gpu-02").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("used by node gpu-01"), "{refused:?}");

    // Revocable: an admin revokes a token before anyone joins with it.
    let admin = channel(&cluster, &ClientTls { ca_pem: tls.ca_pem.clone(), identity: None }).await;
    let mut security = SecurityServiceClient::with_interceptor(admin, Bearer::new(Some(&tls.admin_token)).unwrap());
    let created = security
        .create_token(CreateTokenRequest { role: "join".into(), reusable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    join(&cluster, &created.token, "gpu-03").await.unwrap();
    security.revoke_token(RevokeTokenRequest { id: created.id.clone() }).await.unwrap();
    let refused = join(&cluster, &created.token, "gpu-04").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("revoked"), "{refused:?}");

    // A joined name is bound to its certificate: a reusable token cannot take it...
    let refused = join(&cluster, &tls.join_token, "gpu-01").await.unwrap_err();
    assert!(refused.message().contains("node gpu-01 has already joined"), "{refused:?}");
    // ...and another certificate of the same CA for the name cannot register as it.
    register(&cluster, first.clone(), "gpu-01").await.unwrap();
    let ca = ClusterCa::from_pem(&tls.ca_pem, &std::fs::read_to_string(tls.dir.join(files::CA_KEY)).unwrap()).unwrap();
    let (key, csr) = node_csr("gpu-01").unwrap();
    let forged = ca.sign_node_csr(&csr, "gpu-01", Duration::from_secs(600)).unwrap();
    let refused = register(&cluster, (forged, key), "gpu-01").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("bound to the certificate it first joined with"), "{refused:?}");

    // An admin re-issues the name (a reinstalled node) with a token bound to it.
    let mut bound = Claims::new(Role::Join, "ops", Duration::from_secs(600));
    bound.node = Some("gpu-01".into());
    let reissued = join(&cluster, &tls.token_key.mint(&bound), "gpu-01").await.unwrap();
    register(&cluster, reissued, "gpu-01").await.unwrap();
    let refused = register(&cluster, first, "gpu-01").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "the old certificate is no longer the node's");
}
