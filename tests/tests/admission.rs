//! What submit admits, against a TLS controller with two one-GPU nodes and a
//! submit token (issue 14): a job the cluster could never hold is refused
//! naming the field and the cluster's size; a submit token's priority is
//! capped (an admin's is not); a repeated request id returns the first job.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::{JobFile, JobState, ListJobsRequest, SubmitJobRequest};
use cohort_runtime::tls::Role;
use cohort_tests::{Cluster, NodeSpec, state};
use tonic::Code;

fn file(yaml: &str) -> JobFile {
    JobFile { yaml: yaml.into(), source_name: "job.yaml".into(), ..JobFile::default() }
}

fn request(yaml: &str, request_id: &str) -> SubmitJobRequest {
    SubmitJobRequest { file: Some(file(yaml)), request_id: request_id.into() }
}

async fn two_nodes() -> Cluster {
    Cluster::start_with((0..2).map(|i| NodeSpec::loopback(i, 1)).collect(), &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_could_never_fit_is_refused_and_priority_is_capped_for_submit_tokens() {
    let cluster = two_nodes().await;
    let tls = cluster.tls.as_ref().unwrap();
    let url = cluster.controller_url(0);
    let mut mallory = tls.client(&url, Some(&tls.token(Role::Submit, "mallory"))).await.unwrap();
    let mut admin = cluster.client().await.unwrap();

    // The job: more nodes than exist and a priority above everyone's.
    let greedy =
        "name: greedy\nkind: command\nnodes: 100000\ngpus_per_node: 1\npriority: 1000000\ncommand: [sleep, '300']\n";
    let refused = mallory.submit_job(request(greedy, "")).await.unwrap_err();
    assert!(matches!(refused.code(), Code::InvalidArgument | Code::PermissionDenied), "{refused:?}");
    // Even an admin cannot queue a job the cluster could never hold.
    let refused = admin.submit_job(request(greedy, "")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let message = refused.message();
    assert!(message.contains("nodes: 100000") && message.contains("2 registered node(s)"), "{message}");

    let fat = "name: fat\nkind: command\nnodes: 1\ngpus_per_node: 9\ncommand: ['true']\n";
    let refused = mallory.submit_job(request(fat, "")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("gpus_per_node: 9") && refused.message().contains("1 GPU(s)"), "{refused:?}");

    let labelled = "name: picky\nkind: command\nnodes: 1\nnode_selector: {gpu: b200}\ncommand: ['true']\n";
    let refused = mallory.submit_job(request(labelled, "")).await.unwrap_err();
    assert!(refused.message().contains("0 of them with labels gpu=b200"), "{refused:?}");

    // Priority: a submit token up to the cap, an admin above it.
    let urgent = "name: urgent\nkind: command\nnodes: 1\npriority: 1000000\ncommand: ['true']\n";
    let refused = mallory.submit_job(request(urgent, "")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("priority 1000000 is above 100"), "{refused:?}");
    assert!(refused.message().contains("--max-submit-priority"), "{refused:?}");
    let capped = "name: capped\nkind: command\nnodes: 2\ngpus_per_node: 1\npriority: 100\ncommand: ['true']\n";
    let job = mallory.submit_job(request(capped, "")).await.unwrap().into_inner().job.unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    let job = admin.submit_job(request(urgent, "")).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.priority, 1_000_000);

    // Nothing refused was queued.
    let jobs = admin.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["capped", "urgent"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_id_returns_the_first_job_instead_of_a_second() {
    let cluster = two_nodes().await;
    let tls = cluster.tls.as_ref().unwrap();
    let url = cluster.controller_url(0);
    let mut alice = tls.client(&url, Some(&tls.token(Role::Submit, "alice"))).await.unwrap();
    let mut bob = tls.client(&url, Some(&tls.token(Role::Submit, "bob"))).await.unwrap();
    let yaml = "name: once\nkind: command\nnodes: 1\ncommand: [sleep, '300']\n";

    let first = alice.submit_job(request(yaml, "req-1")).await.unwrap().into_inner().job.unwrap();
    let again = alice.submit_job(request(yaml, "req-1")).await.unwrap().into_inner().job.unwrap();
    assert_eq!(again.id, first.id);
    // Another file under the same id is a client bug: refused, naming the first job.
    let other = "name: other\nkind: command\nnodes: 1\ncommand: [sleep, '300']\n";
    let refused = alice.submit_job(request(other, "req-1")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains(&first.id), "{refused:?}");
    // Ids are per user: bob's req-1 is his own job.
    let bobs = bob.submit_job(request(yaml, "req-1")).await.unwrap().into_inner().job.unwrap();
    assert_ne!(bobs.id, first.id);

    let jobs = cluster.client().await.unwrap().list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 2, "{:?}", jobs.iter().map(|j| &j.id).collect::<Vec<_>>());
}

/// Forwards TCP to `target`, except that the first connection whose client
/// bytes contain `marker` delivers the request and loses the answer: from
/// then on nothing comes back on it, and it is closed (a controller that
/// took the submit, then a network that dropped the reply).
async fn answer_losing_proxy(target: std::net::SocketAddr, marker: &'static [u8]) -> std::net::SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lost_one = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
            let lost_one = lost_one.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let seen = Arc::new(AtomicBool::new(false));
                let saw = seen.clone();
                let up = tokio::spawn(async move {
                    let (mut buf, mut window) = (vec![0u8; 16384], Vec::new());
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        window.extend_from_slice(&buf[..n]);
                        // Flagged before the request reaches the controller: its answer comes after.
                        if window.windows(marker.len()).any(|w| w == marker) && !lost_one.swap(true, Ordering::SeqCst) {
                            saw.store(true, Ordering::SeqCst);
                        }
                        window.drain(..window.len().saturating_sub(marker.len()));
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if seen.load(Ordering::SeqCst) {
                        // The answer is lost; give the controller a moment, then hang up.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_retries_a_submit_whose_answer_was_lost_and_one_job_is_queued() {
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--insecure"]).await.unwrap();
    let target = cluster.url.trim_start_matches("http://").parse().unwrap();
    let proxy = answer_losing_proxy(target, b"lost-answer-job").await;
    let path = cluster.dir.path().join("job.yaml");
    std::fs::write(&path, "name: lost-answer-job\nkind: command\nnodes: 1\ncommand: [sleep, '300']\n").unwrap();

    let out = std::process::Command::new(cohort_tests::bin("cohort"))
        .args(["--controller", &format!("http://{proxy}"), "--insecure", "submit"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("retrying") && stderr.contains("same request id"), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let jobs = cluster.client().await.unwrap().list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "the retried submit made a second job");
}
