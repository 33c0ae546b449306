//! The job API's limits against a real controller: an oversized job file, a
//! request over the message limit and a client over its rate get a clear gRPC
//! status naming the limit and the flag, and change nothing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::{JobFile, ListJobsRequest, SubmitJobRequest};
use cohort_tests::{Cluster, NodeSpec};

const JOB: &str = "name: small\nkind: command\nnodes: 1\ncommand: ['true']\n";

fn submit_request(yaml: String) -> SubmitJobRequest {
    SubmitJobRequest {
        file: Some(JobFile { yaml, source_name: "big.yaml".into(), ..JobFile::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_too_frequent_requests_are_refused_and_change_nothing() {
    let cluster = Cluster::start_with(
        vec![NodeSpec::loopback(0, 1)],
        &[
            "--max-job-file-size",
            "4KiB",
            "--max-request-size",
            "64KiB",
            "--api-rate-limit",
            "2",
            "--api-rate-burst",
            "20",
        ],
    )
    .await
    .unwrap();
    let mut client = cluster.client().await.unwrap();
    // The harness's own calls while starting may have used the burst: 2 s refill it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A job file over --max-job-file-size (valid YAML: a long comment).
    let big = format!("{JOB}# {}\n", "x".repeat(5000));
    let refused = client.submit_job(submit_request(big)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("big.yaml") && refused.message().contains("--max-job-file-size"),
        "{}",
        refused.message()
    );

    // A request message over --max-request-size: refused by the transport, before any handler.
    let huge = format!("{JOB}# {}\n", "x".repeat(100 * 1024));
    let refused = client.submit_job(submit_request(huge)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");

    let jobs = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty(), "a refused request created a job: {jobs:?}");

    // Over the rate: a burst of 20, then 20 calls a second; 200 calls in a row
    // cannot all pass unless each took longer than 50 ms.
    let mut exhausted = None;
    for _ in 0..200 {
        if let Err(status) = client.list_jobs(ListJobsRequest::default()).await {
            exhausted = Some(status);
            break;
        }
    }
    let status = exhausted.expect("200 calls in a row all passed a limit of 20/s with a burst of 20");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--api-rate-limit") && status.message().contains("retry in"),
        "{}",
        status.message()
    );

    // The budget comes back: a submit after the refill goes through.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let job = client.submit_job(submit_request(JOB.into())).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.name, "small");
}
