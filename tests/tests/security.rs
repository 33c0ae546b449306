//! Mutual TLS and tokens against real controller and agent processes: who is
//! refused (no certificate, another CA's certificate, an expired join token, a
//! node speaking for another node, a server that is not a controller) and
//! that nothing they tried got registered; what each token role may do.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::security_service_client::SecurityServiceClient;
use cohort_proto::{
    AgentMessage, CancelJobRequest, GetJobRequest, Hello, JobFile, JobState, JoinRequest, ListJobsRequest,
    ListNodesRequest, NodeInfo, RegisterRequest, SubmitJobRequest, agent_message::Msg,
};
use cohort_runtime::tls::pki::node_csr;
use cohort_runtime::tls::token::unix_now;
use cohort_runtime::tls::{Claims, ClientTls, ClusterCa, Role, ServerTls, files};
use cohort_tests::{Cluster, NodeSpec, bin, state};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

async fn channel(cluster: &Cluster, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(cluster.controller_url(0)).unwrap().connect_timeout(Duration::from_secs(5));
    tls.apply(endpoint).unwrap().connect().await
}

fn node(name: &str) -> NodeInfo {
    NodeInfo { name: name.into(), advertise_addr: "127.0.0.9".into(), ..NodeInfo::default() }
}

async fn node_names(cluster: &Cluster) -> Vec<String> {
    let nodes = cluster.client().await.unwrap().list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
    nodes.into_iter().filter_map(|n| n.info.map(|i| i.name)).collect()
}

/// Joins as `name` with a fresh key; returns (certificate, key).
async fn join(cluster: &Cluster, token: &str, name: &str) -> Result<(String, String), tonic::Status> {
    let tls = cluster.tls.as_ref().unwrap();
    let ch = channel(cluster, &ClientTls { ca_pem: tls.ca_pem.clone(), identity: None }).await.unwrap();
    let (key, csr_pem) = node_csr(name).unwrap();
    let request = JoinRequest { token: token.into(), node_name: name.into(), csr_pem };
    let joined = SecurityServiceClient::new(ch).join(request).await?.into_inner();
    Ok((joined.cert_pem, key))
}

/// A certificate and key for `name` from a CA that is not the cluster's.
fn foreign_identity(name: &str) -> (String, String, String) {
    let other = ClusterCa::generate("elsewhere", Duration::from_secs(3600)).unwrap();
    let (key, csr) = node_csr(name).unwrap();
    let cert = other.sign_node_csr(&csr, name, Duration::from_secs(3600)).unwrap();
    (other.cert_pem().to_string(), cert, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_agents_with_a_valid_certificate_of_their_own_node_get_in() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();
    let ca_only = ClientTls { ca_pem: tls.ca_pem.clone(), identity: None };

    // 1. No certificate: TLS works (the CLI has none either), registering does not.
    let mut agent = AgentServiceClient::new(channel(&cluster, &ca_only).await.unwrap());
    let refused = agent
        .register(RegisterRequest { node: Some(node("intruder")), running: vec![], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("node certificate"), "{}", refused.message());

    // 2. A certificate of another CA: the handshake fails.
    let (foreign_ca, cert, key) = foreign_identity("intruder-2");
    let foreign = ClientTls { ca_pem: tls.ca_pem.clone(), identity: Some((cert, key)) };
    let outcome = match channel(&cluster, &foreign).await {
        Err(e) => Err(format!("{e:?}")),
        Ok(ch) => AgentServiceClient::new(ch)
            .register(RegisterRequest { node: Some(node("intruder-2")), running: vec![], ..Default::default() })
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
    };
    assert!(outcome.is_err(), "a certificate of another CA was accepted");
    // ...and a client trusting only that other CA refuses the controller.
    let wrong_trust = ClientTls { ca_pem: foreign_ca, identity: None };
    let err = channel(&cluster, &wrong_trust).await.unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

    // 3. An expired join token: refused, no certificate issued.
    let mut expired = Claims::new(Role::Join, "ops", Duration::from_secs(60));
    expired.exp = unix_now() - 5;
    let expired = tls.token_key.mint(&expired);
    let status = join(&cluster, &expired, "late-node").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{}", status.message());
    // The real agent with that token gives up with the reason and writes no certificate.
    let work = cluster.dir.path().join("late-node");
    let out = Command::new(bin("cohort-agent"))
        .args(["--controller", &cluster.url, "--node-name", "late-node", "--advertise-addr", "127.0.0.9"])
        .arg("--work-dir")
        .arg(&work)
        .arg("--ca-cert")
        .arg(tls.dir.join(files::CA_CERT))
        .args(["--join-token", &expired, "--fake-gpus", "1"])
        // As the harness's agents: no machine config; tests run as root and so do their ranks.
        .env("COHORT_AGENT_CONFIG", "/dev/null")
        .env("COHORT_ALLOW_ROOT_RANKS", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(!work.join("tls").join(files::NODE_CERT).exists());
    // Other tokens do not join; a join token bound to a node joins only as that node.
    let view = tls.token(Role::View, "viewer");
    assert_eq!(join(&cluster, &view, "sneaky").await.unwrap_err().code(), Code::PermissionDenied);
    let mut bound = Claims::new(Role::Join, "ops", Duration::from_secs(60));
    bound.node = Some("gpu-07".into());
    let bound = tls.token_key.mint(&bound);
    assert_eq!(join(&cluster, &bound, "gpu-08").await.unwrap_err().code(), Code::PermissionDenied);

    // 4. A valid certificate of node-x cannot speak for node0 or anyone else.
    let (cert, key) = join(&cluster, &tls.join_token, "node-x").await.unwrap();
    let node_x = ClientTls { ca_pem: tls.ca_pem.clone(), identity: Some((cert, key)) };
    let mut agent = AgentServiceClient::new(channel(&cluster, &node_x).await.unwrap());
    for victim in ["node0", "victim"] {
        let refused = agent
            .register(RegisterRequest { node: Some(node(victim)), running: vec![], ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("node-x"), "{}", refused.message());
    }
    // Nor can it open a session in another node's name.
    let hello = AgentMessage { msg: Some(Msg::Hello(Hello { node_name: "node0".into(), session_id: "s".into() })) };
    let refused = agent.session(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A node certificate is not a user: the job API refuses it.
    let mut as_user =
        cohort_proto::job_service_client::JobServiceClient::new(channel(&cluster, &node_x).await.unwrap());
    assert_eq!(as_user.list_jobs(ListJobsRequest::default()).await.unwrap_err().code(), Code::PermissionDenied);

    // Nothing that was refused got registered; node0 is still Ready.
    assert_eq!(node_names(&cluster).await, ["node0"]);
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(5)).await.unwrap();
    let log = cluster.controller_log();
    assert!(log.contains("call refused"), "refusals are logged:\n{log}");
}

/// A server holding a certificate of the cluster's CA that is not a
/// controller's is refused by the client side agents and the CLI use.
#[tokio::test(flavor = "multi_thread")]
async fn clients_talk_only_to_a_controller_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let init = Command::new(bin("cohort-controller")).arg("init").arg("--tls-dir").arg(dir.path()).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    // A node certificate with a server's usage and the right address: all the
    // standard checks pass, only "is it a controller's" fails.
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&read(files::CA_CERT), rcgen::KeyPair::from_pem(&read(files::CA_KEY)).unwrap())
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "cohort");
    params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, "node");
    params.distinguished_name.push(rcgen::DnType::CommonName, "node-posing-as-controller");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let rogue = ServerTls { ca_pem: read(files::CA_CERT), cert_pem: cert.pem(), key_pem: key.serialize_pem() };
    let mut config = rogue.https().unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let client = ClientTls { ca_pem: read(files::CA_CERT), identity: None };
    let endpoint = client.apply(Endpoint::from_shared(format!("https://{addr}")).unwrap()).unwrap();
    let err = endpoint.connect().await.unwrap_err();
    let text = cohort_runtime::error_chain(&err);
    assert!(text.contains("not of a Cohort controller"), "{text}");

    // The same CA's controller certificate passes the same check.
    let good = ServerTls::load(dir.path()).unwrap();
    let mut config = good.https().unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshake = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });
    let endpoint = client.apply(Endpoint::from_shared(format!("https://{addr}")).unwrap()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.connect()).await;
    handshake.await.unwrap().unwrap();
}

fn sleeper(name: &str) -> JobFile {
    JobFile {
        yaml: format!("name: {name}\nkind: command\nnodes: 1\ncommand: [sleep, '300']\n"),
        source_name: format!("{name}.yaml"),
        ..JobFile::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_carry_roles_view_reads_submit_owns_admin_rules() {
    let http = cohort_tests::SparePort::take();
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 0)], &["--http", &http.addr()]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();
    let url = cluster.controller_url(0);
    let mut admin = cluster.client().await.unwrap();
    let mut view = tls.client(&url, Some(&tls.token(Role::View, "vera"))).await.unwrap();
    let mut alice = tls.client(&url, Some(&tls.token(Role::Submit, "alice"))).await.unwrap();
    let mut bob = tls.client(&url, Some(&tls.token(Role::Submit, "bob"))).await.unwrap();

    let job = alice
        .submit_job(SubmitJobRequest { file: Some(sleeper("alices")), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let job = job.job.unwrap();
    assert_eq!(job.file.as_ref().unwrap().submitted_by, "alice");
    cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();

    // view: reads, cannot submit or cancel; nothing changes.
    assert_eq!(view.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs.len(), 1);
    assert_eq!(view.get_job(GetJobRequest { job: job.id.clone() }).await.unwrap().into_inner().id, job.id);
    let refused =
        view.submit_job(SubmitJobRequest { file: Some(sleeper("viewers")), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("vera (view token)"), "{}", refused.message());
    let refused = view.cancel_job(CancelJobRequest { job: job.id.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // The CLI says the same, and exits non-zero.
    let out = Command::new(bin("cohort"))
        .args(["--controller", &url, "--ca-cert"])
        .arg(tls.dir.join(files::CA_CERT))
        .args(["--token", &tls.token(Role::View, "vera"), "cancel", &job.id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token of role submit"), "{out:?}");

    // submit: bob cannot cancel alice's job; alice can.
    let refused = bob.cancel_job(CancelJobRequest { job: job.id.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("submitted by alice"), "{}", refused.message());
    let jobs = admin.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1, "the refused submit created nothing");
    assert_eq!(state(&jobs[0]), JobState::Running, "the refused cancels changed nothing");
    alice.cancel_job(CancelJobRequest { job: job.id.clone() }).await.unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Cancelled);

    // admin only: node operations and tokens.
    let refused = alice.cordon_node(cohort_proto::NodeRequest { node: "node0".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let cli = |token: &str, args: &[&str]| {
        Command::new(bin("cohort"))
            .args(["--controller", &url, "--ca-cert"])
            .arg(tls.dir.join(files::CA_CERT))
            .args(["--token", token])
            .args(args)
            .output()
            .unwrap()
    };
    let made = cli(&tls.admin_token, &["token", "create", "--role", "view", "--user", "carol"]);
    assert!(made.status.success(), "{made:?}");
    let carol = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(cli(&carol, &["jobs"]).status.success());
    assert!(!cli(&carol, &["token", "create"]).status.success(), "a view token cannot make tokens");
    // No token, or a made-up one: unauthenticated.
    let mut anonymous = tls.client(&url, None).await.unwrap();
    assert_eq!(anonymous.list_jobs(ListJobsRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut forged = tls.client(&url, Some("cohort1.e30.AAAA")).await.unwrap();
    assert_eq!(forged.list_jobs(ListJobsRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
    // Plaintext to a TLS controller is refused by the CLI before it connects.
    let plain = Command::new(bin("cohort"))
        .args(["--controller", &url.replace("https://", "http://"), "jobs"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&plain.stderr).contains("needs --insecure"), "{plain:?}");

    // The web page's data over HTTPS: a token is needed, /healthz stays open.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let api = format!("https://{}/api/cluster", http.addr());
    assert_eq!(https.get(&api).send().await.unwrap().status(), 401);
    let ok = https.get(&api).bearer_auth(tls.token(Role::View, "vera")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("node0"));
    let join_only = https.get(&api).bearer_auth(&tls.join_token).send().await.unwrap();
    assert_eq!(join_only.status(), 403);
    let health = https.get(format!("https://{}/healthz", http.addr())).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_is_explicit_and_warned_about() {
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 0)], &["--insecure"]).await.unwrap();
    assert!(cluster.url.starts_with("http://"));
    let job = cluster.submit("name: plain\nkind: command\nnodes: 1\ncommand: [sh, -c, 'exit 0']\n").await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded);
    assert!(cluster.controller_log().contains("--insecure: plaintext"), "{}", cluster.controller_log());
    // Without --insecure or a TLS directory, a controller refuses to start and says how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("cohort-controller"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cohort-controller init") && stderr.contains("--insecure"), "{stderr}");
}

/// Mistakes a new user makes get an error that says what to do, on one line
/// each, and the daemons' logs and exits stay free of colour codes and
/// backtraces (issue 16, finding 6).
#[tokio::test(flavor = "multi_thread")]
async fn errors_say_what_to_do() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 0)]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();
    let ca = tls.dir.join(files::CA_CERT);
    let address = cluster.url.trim_start_matches("https://").to_owned();
    let cohort = |args: &[&str]| {
        let out = Command::new(bin("cohort")).args(["--controller", &address]).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // Plaintext against a TLS controller: what to pass instead.
    let said = cohort(&["--insecure", "jobs"]);
    eprintln!("plaintext to TLS: {said}");
    assert!(said.contains("hint:") && said.contains("drop --insecure") && said.contains("--ca-cert"), "{said}");
    // No token: which flag takes one, and where one comes from.
    let said = cohort(&["--ca-cert", ca.to_str().unwrap(), "jobs"]);
    assert!(said.contains("pass --token") && said.contains("cohort token create"), "{said}");
    assert!(!said.contains("the caller is a caller"), "{said}");

    // COHORT_INSECURE=1 is a yes (like true/yes/on), and a refused
    // connection says each cause once.
    let out = Command::new(bin("cohort"))
        .env("COHORT_INSECURE", "1")
        .args(["--controller", "127.0.0.1:1", "jobs"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("cannot reach a controller") && !said.contains("invalid value"), "{said}");
    assert_eq!(said.matches("tcp connect error").count(), 1, "{said}");

    // A daemon that cannot start: one error line, no backtrace even with RUST_BACKTRACE.
    let dir = tempfile::tempdir().unwrap();
    let taken = cluster.url.trim_start_matches("https://");
    let out = Command::new(bin("cohort-controller"))
        .env("RUST_BACKTRACE", "1")
        .args(["--insecure", "--listen", taken, "--http", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let error = said.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {said}"));
    assert!(error.contains(taken), "{error}");
    assert!(!said.contains("stack backtrace") && !said.contains("<unknown>"), "{said}");

    // Logs written to a file carry no terminal colour codes.
    let log = cluster.controller_log();
    assert!(log.contains("INFO") && !log.contains('\u{1b}'), "{}", &log[..log.len().min(400)]);
}
