//! The controller's web page (`--http`) in a real headless browser: both nodes,
//! the job, and its loss curve drawn as SVG by the page's own script. Needs
//! Chromium (`apt-get install -y --no-install-recommends chromium fonts-dejavu-core`)
//! or COHORT_CHROMIUM naming a Chrome/Chromium binary.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, SparePort, state};

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("COHORT_CHROMIUM") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!(
        "no Chromium found: install it (apt-get install -y --no-install-recommends chromium fonts-dejavu-core) \
         or set COHORT_CHROMIUM"
    );
}

/// Runs headless Chromium on `url` with `args` (e.g. `--dump-dom`); returns stdout.
async fn headless(profile: &Path, url: &str, args: &[&str]) -> String {
    let run = tokio::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=8000"])
        // The test cluster's own CA is not in the browser's store.
        .arg("--ignore-certificate-errors")
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run).await.expect("chromium ran over 90 s").unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `data-iteration` of every loss point the page drew, in document order.
fn loss_points(dom: &str) -> Vec<u64> {
    dom.split("<circle")
        .skip(1)
        .map(|c| &c[..c.find('>').unwrap_or(c.len())])
        .filter(|c| c.contains(r#"class="point""#))
        .map(|c| {
            let value = c.split(r#"data-iteration=""#).nth(1).unwrap();
            value[..value.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_both_nodes_and_the_jobs_loss_curve() {
    let http = SparePort::take();
    let nodes = (0..2).map(|i| NodeSpec::loopback(i, 1)).collect();
    let cluster = Cluster::start_with(nodes, &["--http", &http.addr()]).await.unwrap();
    let job = cluster
        .submit(
            "name: curve\nkind: command\nnodes: 2\ngpus_per_node: 1\nworkdir: tests/payloads\n\
             command: [python3, swift4_metrics.py, '20']\n",
        )
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
    cluster
        .wait_job(&job.id, Duration::from_secs(10), |j| j.progress.as_ref().is_some_and(|p| p.iteration == 20))
        .await
        .unwrap();

    let url = cluster.page_url(&http.addr());
    let profile = cluster.dir.path().join("chromium");
    let dom = headless(&profile, &url, &["--dump-dom"]).await;
    for name in ["node0", "node1", "127.0.0.2", "127.0.0.3", &job.id] {
        assert!(dom.contains(name), "{name} is not on the page:\n{dom}");
    }
    assert_eq!(loss_points(&dom), [1, 5, 10, 15, 20], "the chart's points:\n{dom}");
    assert!(dom.contains(r#"data-loss="0.1""#), "the last point's loss (2.0 / 20):\n{dom}");
    assert!(dom.contains(r#"class="pill succeeded""#), "the job's state:\n{dom}");

    // A screenshot to look at (the test only checks that it was written).
    let png = std::env::temp_dir().join("cohort-ui.png");
    let _ = std::fs::remove_file(&png);
    headless(&profile, &url, &[&format!("--screenshot={}", png.display()), "--window-size=1280,900"]).await;
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"), "{}", png.display());
    eprintln!("screenshot: {}", png.display());
}
