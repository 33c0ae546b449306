//! Issue 18, item 4: a node's staging cache stays under `--cache-max`, least
//! recently used content first, never content a running job uses. A real
//! controller and agent on loopback; each input a 2 MiB directory, the limit
//! 3 MiB.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, state};

const MIB: usize = 1 << 20;

/// A 2 MiB input of its own content; returns its directory.
fn input(root: &Path, name: &str, byte: u8) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("weights.bin"), vec![byte; 2 * MIB]).unwrap();
    dir
}

/// Every content directory in the node's caches (the agent's own and each user's).
fn cached(cache: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![cache.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let in_sha256 = dir.file_name().is_some_and(|n| n == "sha256");
            if in_sha256 && entry.file_name().len() == 64 {
                found.push(path);
            } else if !in_sha256 {
                dirs.push(path);
            }
        }
    }
    found
}

/// The content directories holding the input made with `byte`.
fn copies_of(cache: &Path, byte: u8) -> usize {
    cached(cache)
        .iter()
        .filter(|d| std::fs::read(d.join("weights.bin")).is_ok_and(|w| w.len() == 2 * MIB && w[0] == byte))
        .count()
}

fn job(name: &str, source: &Path, command: &str) -> String {
    format!(
        "name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\nstop_grace: 1s\n\
         stage: [{{name: input, source: {}}}]\ncommand: {command}\n",
        source.display()
    )
}

async fn run_to_end(cluster: &Cluster, name: &str, source: &Path) -> Job {
    let submitted = cluster.submit(&job(name, source, "['true']")).await.unwrap();
    let done = cluster.wait_finished(&submitted.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_keeps_under_its_limit_without_touching_what_a_running_job_uses() {
    let mut node = NodeSpec::loopback(0, 2);
    node.extra_args = vec!["--cache-max".into(), "3MiB".into()];
    let cluster = Cluster::start(vec![node]).await.unwrap();
    let cache = cluster.dir.path().join("node0/cache");
    let inputs = cluster.dir.path().join("inputs");
    let (a, b, c) = (input(&inputs, "a", 1), input(&inputs, "b", 2), input(&inputs, "c", 3));

    // A job that holds input a until released.
    let release = cluster.dir.path().join("release");
    let held = job("holds-a", &a, &format!("[sh, -c, 'while [ ! -e {} ]; do sleep 0.1; done']", release.display()));
    let holder = cluster.submit(&held).await.unwrap();
    cluster
        .wait_job(&holder.id, Duration::from_secs(60), |j| state(j) == JobState::Running && j.live_processes == 1)
        .await
        .unwrap();

    // b stages: 4 MiB, over the limit, but a is in use and b is being prepared.
    run_to_end(&cluster, "uses-b", &b).await;
    assert_eq!((copies_of(&cache, 1), copies_of(&cache, 2)), (1, 1));

    // c stages: b (no longer in use, least recently used) goes; a stays for its job.
    run_to_end(&cluster, "uses-c", &c).await;
    assert_eq!((copies_of(&cache, 1), copies_of(&cache, 2), copies_of(&cache, 3)), (1, 0, 1));

    // The holder ends: b staged again (copied, not found) pushes out a and c.
    std::fs::write(&release, b"").unwrap();
    let ended = cluster.wait_finished(&holder.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&ended), JobState::Succeeded, "{}", ended.reason);
    let again = run_to_end(&cluster, "uses-b-again", &b).await;
    assert_eq!(again.staging.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(), ["ready"], "copied again");
    assert_eq!((copies_of(&cache, 1), copies_of(&cache, 2), copies_of(&cache, 3)), (0, 1, 0));
    assert!(cached(&cache).len() == 1, "{:?}", cached(&cache));
}

/// Issue 18, item 3: a staged model reaches the job's processes as the hub
/// library's cache variable, at the node's own layout.
#[tokio::test(flavor = "multi_thread")]
async fn a_staged_model_is_found_by_its_id_in_the_nodes_hub_cache() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let model = input(&cluster.dir.path().join("inputs"), "qwen", 7);
    let check = "[sh, -c, 'test \"$(cat $HF_HUB_CACHE/models--Qwen--Qwen3-8B/refs/main)\" = \"$(basename $COHORT_STAGED_QWEN_QWEN3_8B | cut -c1-40)\" && \
                 cmp $HF_HUB_CACHE/models--Qwen--Qwen3-8B/snapshots/*/weights.bin $COHORT_STAGED_QWEN_QWEN3_8B/weights.bin && \
                 cmp $MODELSCOPE_CACHE/models/Qwen/Qwen3-8B/weights.bin $COHORT_STAGED_QWEN_QWEN3_8B/weights.bin']";
    let yaml = format!(
        "name: model\nkind: command\nnodes: 1\ngpus_per_node: 1\nstop_grace: 1s\nstage:\n  \
         - {{model: Qwen/Qwen3-8B, source: {0}, layout: huggingface}}\n  \
         - {{name: ms, model: Qwen/Qwen3-8B, source: {0}}}\ncommand: {check}\n",
        model.display()
    );
    let submitted = cluster.submit(&yaml).await.unwrap();
    let done = cluster.wait_finished(&submitted.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{} {:?}", done.reason, done.attempts);
    let hubs: Vec<&str> = done.staging.iter().map(|s| s.hub_cache.as_str()).collect();
    assert!(hubs.iter().all(|h| h.ends_with("/hub/huggingface") || h.ends_with("/hub/modelscope")), "{hubs:?}");
}
