//! `cohort dev up` / `cohort dev down`: a local TLS cluster started by the
//! CLI alone, used with only the three variables it prints, and stopped with
//! nothing of it left running.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cohort_tests::{SparePort, bin};

/// `cohort ARGS` with none of the caller's COHORT_* settings, only `env`.
fn cohort(args: &[&str], env: &[(String, String)]) -> Output {
    let mut command = Command::new(bin("cohort"));
    for (key, _) in std::env::vars() {
        if key.starts_with("COHORT_") {
            command.env_remove(key);
        }
    }
    command.args(args).envs(env.iter().cloned()).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `export A=1 B=2` -> [(A, 1), (B, 2)] (the dev dir is a temp dir: no spaces to quote).
fn exports(stdout: &[u8]) -> Vec<(String, String)> {
    let stdout = String::from_utf8_lossy(stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("export ")).expect("an export line on stdout");
    line.split_whitespace().map(|kv| kv.split_once('=').unwrap()).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Live processes of the dev cluster in `dir`: daemons naming it in their
/// command line, ranks carrying an agent work dir under it.
fn processes_of(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_str().unwrap();
    let marker = format!("COHORT_AGENT_WORK_DIR={dir}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let rank = environ.split(|b| *b == 0).any(|v| v.starts_with(marker.as_bytes()));
            (rank || cmdline.contains(dir)).then_some((pid, cmdline))
        })
        .filter(|(pid, _)| *pid != std::process::id())
        .collect()
}

/// `cohort dev down` when a test ends, passed or not (declared after the temp
/// dir, it drops first): a failed assertion leaves no cluster behind.
struct DownOnDrop<'a>(&'a Path);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.exists() {
            cohort(&["dev", "down", "--dir", self.0.to_str().unwrap()], &[]);
        }
    }
}

fn ranks_of(dir: &Path) -> usize {
    let marker = format!("COHORT_AGENT_WORK_DIR={}/", dir.to_str().unwrap());
    processes_of(dir)
        .iter()
        .filter(|(pid, _)| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|b| *b == 0).any(|v| v.starts_with(marker.as_bytes()))
        })
        .count()
}

#[test]
fn dev_up_gives_a_cluster_that_runs_a_two_node_job_and_dev_down_leaves_nothing_running() {
    let tmp = tempfile::Builder::new().prefix("cohort-dev-").tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let _down = DownOnDrop(&dir);
    let dir_arg = dir.to_str().unwrap();
    let port = SparePort::take();
    let port_arg = port.port.to_string();

    let up = cohort(&["dev", "up", "--nodes", "2", "--dir", dir_arg, "--port", &port_arg], &[]);
    assert!(up.status.success(), "{}", text(&up));
    let env = exports(&up.stdout);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["COHORT_CONTROLLER", "COHORT_CA_CERT", "COHORT_TOKEN_FILE"], "{}", text(&up));
    assert!(env[0].1.starts_with("https://"), "TLS: {}", env[0].1);

    // Only the printed variables: a two-node job succeeds.
    let job = cohort(&["run", "-N", "2", "--wait", "--", "true"], &env);
    assert!(job.status.success(), "{}", text(&job));
    let jobs = cohort(&["jobs", "-o", "json"], &env);
    assert!(String::from_utf8_lossy(&jobs.stdout).contains("\"state\": \"Succeeded\""), "{}", text(&jobs));

    // `up` again: the same cluster (same processes), the same lines.
    let before = processes_of(&dir);
    let again = cohort(&["dev", "up", "--dir", dir_arg], &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already runs"), "{}", text(&again));
    assert_eq!(exports(&again.stdout), env);
    assert_eq!(processes_of(&dir), before);
    let status = cohort(&["dev", "status", "--dir", dir_arg], &[]);
    assert!(status.status.success(), "{}", text(&status));
    assert_eq!(String::from_utf8_lossy(&status.stdout).matches("Ready").count(), 2, "{}", text(&status));
    // Another shape while it runs is refused, naming the way out.
    let reshape = cohort(&["dev", "up", "--nodes", "3", "--dir", dir_arg], &[]);
    assert!(!reshape.status.success(), "{}", text(&reshape));
    assert!(String::from_utf8_lossy(&reshape.stderr).contains("`cohort dev down --dir"), "{}", text(&reshape));
    assert_eq!(processes_of(&dir), before);

    // A job still running when the cluster goes down: its ranks go too.
    let long = cohort(&["run", "-N", "2", "--", "sleep", "300"], &env);
    assert!(long.status.success(), "{}", text(&long));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ranks_of(&dir) < 2 {
        assert!(Instant::now() < deadline, "the sleep ranks never started: {:?}", processes_of(&dir));
        std::thread::sleep(Duration::from_millis(100));
    }

    let down = cohort(&["dev", "down", "--dir", dir_arg], &[]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(processes_of(&dir), Vec::new(), "{}", text(&down));
    for name in ["controller", "node0", "node1"] {
        assert!(!dir.join(format!("{name}.pid")).exists(), "{name}.pid left");
    }
    // Up again on the same directory: the same CA and port, the nodes join again.
    let restart = cohort(&["dev", "up", "--dir", dir_arg], &[]);
    assert!(restart.status.success(), "{}", text(&restart));
    assert_eq!(exports(&restart.stdout), env);
    let job = cohort(&["run", "-N", "2", "--wait", "--", "true"], &env);
    assert!(job.status.success(), "{}", text(&job));
    let down = cohort(&["dev", "down", "--dir", dir_arg], &[]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(processes_of(&dir), Vec::new(), "{}", text(&down));

    // Down again with nothing running is fine; --purge removes the directory.
    let purge = cohort(&["dev", "down", "--dir", dir_arg, "--purge"], &[]);
    assert!(purge.status.success(), "{}", text(&purge));
    assert!(!dir.exists());
}

#[test]
fn dev_up_on_a_port_in_use_names_the_flag_to_change() {
    let tmp = tempfile::Builder::new().prefix("cohort-dev-").tempdir().unwrap();
    let port = SparePort::take();
    let _taken = std::net::TcpListener::bind(port.addr()).unwrap();
    let up = cohort(&["dev", "up", "--dir", tmp.path().to_str().unwrap(), "--port", &port.port.to_string()], &[]);
    assert!(!up.status.success(), "{}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains(&format!("port {} on 127.0.0.1 is in use: pass --port", port.port)), "{stderr}");
    assert_eq!(processes_of(&tmp.path().canonicalize().unwrap()), Vec::new());
}

#[test]
fn a_process_that_dies_during_dev_up_is_named_with_its_log() {
    let tmp = tempfile::Builder::new().prefix("cohort-dev-").tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    // node1's work dir cannot be made: a file is in the way, and its agent exits at start.
    std::fs::write(dir.join("node1"), "").unwrap();
    let _down = DownOnDrop(&dir);
    let port = SparePort::take();
    let dir_arg = dir.to_str().unwrap();
    let up = cohort(&["dev", "up", "--dir", dir_arg, "--port", &port.port.to_string()], &[]);
    assert!(!up.status.success(), "{}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    let log = dir.join("node1.log");
    assert!(stderr.contains("node1 exited during start"), "{stderr}");
    assert!(stderr.contains(&format!("its log {} ends with", log.display())), "{stderr}");
    assert!(stderr.contains("--work-dir"), "the log's last lines say why: {stderr}");
    let down = cohort(&["dev", "down", "--dir", dir_arg], &[]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(processes_of(&dir), Vec::new(), "{}", text(&down));
}
