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

/// A job that uses `source` and runs until the returned file is written.
async fn hold(cluster: &Cluster, source: &Path) -> (Job, PathBuf) {
    let release = cluster.dir.path().join("release");
    let held = job("holds-a", source, &format!("[sh, -c, 'while [ ! -e {} ]; do sleep 0.1; done']", release.display()));
    let holder = cluster.submit(&held).await.unwrap();
    cluster
        .wait_job(&holder.id, Duration::from_secs(60), |j| state(j) == JobState::Running && j.live_processes == 1)
        .await
        .unwrap();
    (holder, release)
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
    let (holder, release) = hold(&cluster, &a).await;

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

fn cli_json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = cluster.cli(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `cohort cache staged -o json`: node0's entries as (user, digest, pinned by).
fn staged(cluster: &Cluster) -> Vec<(String, String, Vec<String>)> {
    let listed = cli_json(cluster, &["cache", "staged", "--node", "node0", "-o", "json"]);
    let node = &listed["nodes"][0];
    assert_eq!(node["error"], "", "{listed}");
    assert_eq!(node["cache"]["limit_bytes"], 5 * MIB as u64, "{listed}");
    node["cache"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let pinned = e["pinned_by"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
            (e["user"].as_str().unwrap().to_owned(), e["sha256"].as_str().unwrap().to_owned(), pinned)
        })
        .collect()
}

fn sha256_of_dir_with_one_file(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let file = std::fs::read(dir.join("weights.bin")).unwrap();
    let line = format!("{:x} {} weights.bin\n", Sha256::digest(&file), file.len());
    format!("{:x}", Sha256::digest(line.as_bytes()))
}

/// Issue 18, item 4: one `--cache-max` over every user's cache of a node (a
/// staging for one user removes another user's older content), `cohort cache
/// staged` and `cohort cache evict` through the controller, and pins that
/// survive an agent restart.
#[tokio::test(flavor = "multi_thread")]
async fn one_limit_over_every_users_cache_listed_and_evicted_through_the_controller() {
    use std::os::unix::fs::PermissionsExt;
    assert!(cohort_tests::is_root(), "this test stages as another user: run it as root (as CI does)");
    let user = "cohort-test-cache";
    cohort_tests::system_user(user);
    let mut node = NodeSpec::loopback(0, 2);
    node.extra_args = ["--cache-max", "5MiB", "--allowed-rank-users", "*"].map(String::from).to_vec();
    let mut cluster = Cluster::start(vec![node]).await.unwrap();
    // The user reaches its cache under the node's work dir, and reads the inputs.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let inputs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(inputs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (a, b, c) = (input(inputs.path(), "a", 1), input(inputs.path(), "b", 2), input(inputs.path(), "c", 3));
    for dir in [&a, &b, &c] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.join("weights.bin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (digest_a, digest_b, digest_c) =
        (sha256_of_dir_with_one_file(&a), sha256_of_dir_with_one_file(&b), sha256_of_dir_with_one_file(&c));
    let cache = cluster.dir.path().join("node0/cache");

    // b for the user first (the oldest), then a and c for the agent's user: 6 MiB against 5.
    let as_user = job("user-b", &b, "['true']").replace("nodes: 1\n", &format!("nodes: 1\nuser: {user}\n"));
    let submitted = cluster.submit(&as_user).await.unwrap();
    let done = cluster.wait_finished(&submitted.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{} {:?}", done.reason, done.attempts);
    assert_eq!(copies_of(&cache.join("users"), 2), 1, "b is in the user's own cache");
    run_to_end(&cluster, "root-a", &a).await;
    assert_eq!(staged(&cluster).len(), 2, "4 MiB: under the limit");
    run_to_end(&cluster, "root-c", &c).await;
    // Each cache alone is under 5 MiB; together they are not: the user's b, the oldest, went.
    assert_eq!((copies_of(&cache, 1), copies_of(&cache, 2), copies_of(&cache, 3)), (1, 0, 1));
    let listed = staged(&cluster);
    assert_eq!(
        listed.iter().map(|(u, d, p)| (u.as_str(), d.as_str(), p.len())).collect::<Vec<_>>(),
        [("root", digest_a.as_str(), 0), ("root", digest_c.as_str(), 0)],
        "least recently used first"
    );
    assert!(!listed.iter().any(|(_, d, _)| *d == digest_b));

    // A running job pins a: listed as such, and its eviction refused.
    let (holder, release) = hold(&cluster, &a).await;
    let pinned_by = vec![format!("{}/1", holder.id)];
    assert!(staged(&cluster).contains(&("root".into(), digest_a.clone(), pinned_by.clone())));
    let refused = cluster.cli(&["cache", "evict", "node0", &digest_a[..10]]);
    let said = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("in use by job {}/1", holder.id)), "{said}");
    assert_eq!(copies_of(&cache, 1), 1, "kept");
    let evicted = cluster.cli(&["cache", "evict", "node0", &digest_c[..10]]);
    let said = String::from_utf8_lossy(&evicted.stdout);
    assert!(evicted.status.success(), "{said} {}", String::from_utf8_lossy(&evicted.stderr));
    assert!(said.contains(&format!("removed {digest_c} from node node0")), "{said}");
    assert_eq!(copies_of(&cache, 3), 0);

    // An agent started while the holder runs knows what it uses: the pin was kept on disk.
    cluster.restart_agent(0);
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    assert!(staged(&cluster).contains(&("root".into(), digest_a.clone(), pinned_by)), "pinned after the restart");
    let unknown = cli_json(&cluster, &["cache", "staged", "-o", "json"]);
    assert_eq!(unknown["nodes"][0]["cache"]["unknown_pins"], false, "{unknown}");
    assert_eq!(cluster.cli(&["cache", "evict", "node0", &digest_a[..10]]).status.code(), Some(1));

    // Once the holder ends, a goes.
    std::fs::write(&release, b"").unwrap();
    let ended = cluster.wait_finished(&holder.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&ended), JobState::Succeeded, "{}", ended.reason);
    let evicted = cluster.cli(&["cache", "evict", "node0", &digest_a[..10]]);
    assert!(evicted.status.success(), "{}", String::from_utf8_lossy(&evicted.stdout));
    assert!(staged(&cluster).is_empty());
    assert!(cached(&cache).is_empty(), "{:?}", cached(&cache));
}
