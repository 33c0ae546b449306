//! The fault suite's cases of the controller itself: paused, its data disk
//! full, a damaged record in its state file. Each starts its controller with
//! `--insecure` and `--http`, to read `/healthz`.

use cohort_proto::{ListNodesRequest, NodeState};
use cohort_tests::SparePort;
use cohort_tests::store_faults::{fill, job_ids, read_raw_record, seq, wait_healthz, write_raw_record};

use super::*;

/// The `env:` line of a lockstep job that runs until `finish` exists (then succeeds).
fn until_file(finish: &std::path::Path) -> String {
    format!("env: {{STEPS: '1000000', FINISH_FILE: '{}'}}\n", finish.display())
}

/// The suite's controller flags, plaintext, with `/healthz` on `http`.
fn args_with_http(http: &SparePort) -> Vec<String> {
    let mut args: Vec<String> = CONTROLLER_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend(["--insecure".into(), "--http".into(), http.addr()]);
    args
}

/// The highest step every rank of the attempt has passed, from the job's log.
fn steps_passed(cluster: &Cluster, job: &Job, attempt: u32) -> u32 {
    let out = cluster.cli(&["logs", &job.id]);
    let text = String::from_utf8_lossy(&out.stdout);
    (0..job.nodes)
        .map(|r| {
            let prefix = format!("rank {r} attempt {attempt}: step ");
            text.lines().filter_map(|l| l.split_once(&prefix)?.1.trim().parse::<u32>().ok()).max().unwrap_or(0)
        })
        .min()
        .unwrap_or(0)
}

/// The (node, pid) of every process of the job's current attempt.
fn pids(job: &Job) -> BTreeSet<(String, u32)> {
    job.processes.iter().map(|p| (p.node_name.clone(), p.pid)).collect()
}

async fn node_states(cluster: &Cluster) -> Vec<(String, NodeState, i64)> {
    let mut client = cluster.client().await.unwrap();
    let nodes = client.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
    nodes
        .into_iter()
        .map(|n| {
            let node_state = n.state();
            (n.info.map(|i| i.name).unwrap_or_default(), node_state, n.last_heartbeat_unix_ms)
        })
        .collect()
}

/// For `window`, the job stays Running in attempt 1 with no failure, and no node is Lost.
async fn stays_running(cluster: &Cluster, id: &str, window: Duration) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        let now = cluster.job(id).await.unwrap();
        assert_eq!(state(&now), JobState::Running, "{}; failure {:?}", now.reason, now.failure);
        assert_eq!((now.attempt, now.failure.as_ref()), (1, None), "{now:?}");
        for (name, node_state, _) in node_states(cluster).await {
            assert_ne!(node_state, NodeState::Lost, "node {name} lost");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The controller is SIGSTOPped (a VM freeze, a starved CPU) for twice the
/// node TTL, less than the agents' fence, while a job runs, then continued:
/// the ranks never notice, the nodes get one TTL of grace on resume, and the
/// job goes on in the same attempt with the same processes. Recovery: from
/// SIGCONT until every node's heartbeat after it was taken and all are Ready.
pub(super) async fn pause_controller() -> Figures {
    const PAUSE: Duration = Duration::from_secs(6);
    let ttl = Duration::from_secs(3);
    let cluster = cluster(nodes_with(2, 1, "15s")).await;
    let finish = cluster.dir.path().join("finish-pause");
    let job = cluster.submit(&job("ctl-pause", 2, &until_file(&finish))).await.unwrap();
    let watch = OverlapWatch::start(&job.id);
    let running = running_past(&cluster, &job.id, 1, 2).await;
    let before = steps_passed(&cluster, &running, 1);
    let controller = Pid::from_raw(cluster.controller_pid().unwrap() as i32);
    kill(controller, Signal::SIGSTOP).unwrap();
    // The fault itself: the controller stays stopped this long.
    tokio::time::sleep(PAUSE).await;
    let resumed_ms = unix_ms_now();
    let resumed = Instant::now();
    kill(controller, Signal::SIGCONT).unwrap();
    let deadline = resumed + Duration::from_secs(20);
    loop {
        let nodes = node_states(&cluster).await;
        if nodes.len() == 2 && nodes.iter().all(|(_, s, hb)| *s == NodeState::Ready && *hb >= resumed_ms) {
            break;
        }
        assert!(Instant::now() < deadline, "nodes not back after the pause: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = resumed.elapsed();
    // Past the grace (one TTL from the resume) and another TTL: nothing was lost.
    stays_running(&cluster, &job.id, ttl * 2).await;
    let now = cluster.job(&job.id).await.unwrap();
    assert_eq!(pids(&now), pids(&running), "the ranks were restarted");
    let after = steps_passed(&cluster, &now, 1);
    assert!(after > before + 20, "the ranks did not train through the pause: step {before} before, {after} after");
    std::fs::write(&finish, b"").unwrap();
    let done = finished_clean(&cluster, &job.id).await;
    watch.assert_none();
    assert_eq!(state(&done), JobState::Succeeded, "{}; failure {:?}", done.reason, done.failure);
    assert_eq!(done.attempts.len(), 1, "{:?}", done.attempts);
    assert!(cluster.controller_log().contains("the liveness sweep ran late"), "the pause went unnoticed");
    Figures { detect: Duration::ZERO, recover: Some(back) }
}

/// The controller's data disk (an 8 MiB tmpfs under the embedded store)
/// fills while a job runs: the job is untouched (heartbeats need no write), a
/// submit is refused with the error and the fix and leaves nothing, `/healthz`
/// is 503; once space is freed the store writes again by itself, a new submit
/// gets a new id, and a restart finds exactly what was accepted. Recovery:
/// space freed until `/healthz` answers 200.
pub(super) async fn fill_controller_disk() -> Figures {
    let http = SparePort::take();
    let args = args_with_http(&http);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::prepare_with(nodes(2), &args).unwrap();
    let data_dir = cluster.data_dir();
    let _disk = Tmpfs::mount(&data_dir, "8m").unwrap();
    cluster.start_prepared().await.unwrap();
    let finish = cluster.dir.path().join("finish-disk");
    let job = cluster.submit(&job("ctl-disk", 2, &until_file(&finish))).await.unwrap();
    let watch = OverlapWatch::start(&job.id);
    let running = running_past(&cluster, &job.id, 1, 2).await;

    let filler = data_dir.join("filler");
    fill(&filler);
    // A record bigger than the state file's spare pages: it needs the disk.
    let big = format!("{}# {}\n", job_file_waiting("while-full"), "x".repeat(600 * 1024));
    let refused = cluster.submit(&big).await.expect_err("a submit on a full disk must fail");
    let message = format!("{refused:#}");
    assert!(message.contains("the controller's store cannot write"), "{message}");
    assert!(message.contains(&format!("free space on {}", data_dir.display())), "{message}");
    assert_eq!(job_ids(&cluster).await, std::slice::from_ref(&job.id), "the refused submit left a job");
    let body = wait_healthz(&http, 503, Duration::from_secs(5)).await;
    assert!(body.contains("cannot write") && body.contains(&data_dir.display().to_string()), "{body}");
    // Longer than the node TTL on a full disk: nodes stay Ready, the job runs on.
    stays_running(&cluster, &job.id, Duration::from_secs(4)).await;

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_healthz(&http, 200, Duration::from_secs(30)).await;
    let recover = freed.elapsed();
    let next = cluster.submit(&job_file_waiting("after-full")).await.unwrap();
    assert!(seq(&next.id) > seq(&job.id), "{} after {}", next.id, job.id);
    let now = cluster.job(&job.id).await.unwrap();
    assert_eq!(pids(&now), pids(&running), "the ranks were restarted");
    std::fs::write(&finish, b"").unwrap();
    let done = finished_clean(&cluster, &job.id).await;
    watch.assert_none();
    assert_eq!(state(&done), JobState::Succeeded, "{}; failure {:?}", done.reason, done.failure);
    assert_eq!(done.attempts.len(), 1, "{:?}", done.attempts);

    // What the store holds after the outage: the two accepted jobs, the first one finished.
    assert!(cluster.stop_controller().is_some_and(|s| s.success()));
    cluster.start_controller().unwrap();
    wait_healthz(&http, 200, Duration::from_secs(20)).await;
    assert_eq!(job_ids(&cluster).await, [job.id.clone(), next.id.clone()]);
    let reloaded = cluster.job(&job.id).await.unwrap();
    assert_eq!(state(&reloaded), JobState::Succeeded, "{reloaded:?}");
    Figures { detect: Duration::ZERO, recover: Some(recover) }
}

/// A one-node job file that waits (nothing left for it to run on).
fn job_file_waiting(name: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: ['true']\n")
}

/// A controller with two running jobs and a finished one is stopped; one
/// running job's record in the state file is damaged so that it no longer
/// decodes; the controller starts again. No panic: the record is moved to
/// quarantine and named in `/healthz`; the finished job, the other running
/// job and the nodes load; the agents reconnect; the kept job is adopted
/// (same pids, one attempt) and succeeds; the quarantined job is no longer
/// known, so the agents' reports of its ranks are answered with stops and
/// none of its processes is left; its id is not handed out again.
/// Detection: start until `/healthz` reports the record; recovery: start
/// until the kept job shows Running again with its processes adopted.
pub(super) async fn corrupt_store_record() -> Figures {
    let http = SparePort::take();
    let args = args_with_http(&http);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // A fence longer than the controller's stop, the damage and the start: the ranks wait for it.
    let mut cluster = Cluster::start_with(nodes_with(2, 2, "15s"), &args).await.unwrap();
    let earlier = cluster.submit(&job("earlier", 2, "env: {STEPS: '2'}\n")).await.unwrap();
    assert_eq!(state(&finished_clean(&cluster, &earlier.id).await), JobState::Succeeded);
    let finish = cluster.dir.path().join("finish-kept");
    let kept = cluster.submit(&job("kept", 2, &until_file(&finish))).await.unwrap();
    let broken = cluster.submit(&job("broken", 2, "env: {STEPS_FIRST: '1000000'}\n")).await.unwrap();
    let kept_running = running_past(&cluster, &kept.id, 1, 2).await;
    running_past(&cluster, &broken.id, 1, 2).await;
    let watch = OverlapWatch::start(&kept.id);

    assert!(cluster.stop_controller().is_some_and(|s| s.success()));
    assert!(!processes_of_job(&broken.id).is_empty(), "a controller's stop must not stop ranks");
    let file = cluster.data_dir().join("state.redb");
    let key = format!("jobs/{}", broken.id);
    let (revision, mut record) = read_raw_record(&file, &key).unwrap();
    // Wire type 7 does not exist: the first field's tag no longer decodes, whatever the record holds.
    record[0] |= 0x07;
    write_raw_record(&file, &key, revision, &record);

    let log_from = cluster.controller_log().len();
    let restarted = Instant::now();
    cluster.start_controller().unwrap();
    let body = wait_healthz(&http, 200, Duration::from_secs(20)).await;
    let detect = restarted.elapsed();
    assert!(body.contains(&format!("warning: store key {key}: undecodable job record")), "{body}");
    assert!(body.contains(&format!("moved to quarantine/{key}")), "{body}");
    assert_eq!(job_ids(&cluster).await, [earlier.id.clone(), kept.id.clone()]);
    let adopted = cluster
        .wait_job(&kept.id, Duration::from_secs(20), |j| {
            state(j) == JobState::Running && pids(j) == pids(&kept_running)
        })
        .await
        .unwrap();
    let recover = restarted.elapsed();
    assert_eq!(adopted.attempt, 1);
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    cluster.wait_nodes_ready(&names, Duration::from_secs(20)).await.unwrap();
    // The quarantined job's ranks: reported by the agents, wanted by nobody, stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_of_job(&broken.id).is_empty() {
        assert!(Instant::now() < deadline, "ranks of the quarantined job left: {:?}", processes_of_job(&broken.id));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = cluster.controller_log()[log_from..].to_string();
    assert!(!log.contains("' panicked at"), "{log}");
    assert!(log.contains(&format!("quarantine/{key}")), "{log}");

    std::fs::write(&finish, b"").unwrap();
    let done = finished_clean(&cluster, &kept.id).await;
    watch.assert_none();
    assert_eq!(state(&done), JobState::Succeeded, "{}; failure {:?}", done.reason, done.failure);
    assert_eq!(done.attempts.len(), 1, "adopted, not restarted: {:?}", done.attempts);
    assert_eq!(state(&cluster.job(&earlier.id).await.unwrap()), JobState::Succeeded);
    let next = cluster.submit(&job("after", 2, "env: {STEPS: '2'}\n")).await.unwrap();
    assert!(seq(&next.id) > seq(&broken.id), "{} reuses a number after {}", next.id, broken.id);
    assert_eq!(state(&finished_clean(&cluster, &next.id).await), JobState::Succeeded);
    Figures { detect, recover: Some(recover) }
}
