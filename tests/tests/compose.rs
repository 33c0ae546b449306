//! The container cluster of deploy/compose (3 etcd members, 2 controllers, 3
//! agents, each agent its own host, mutual TLS): a job across the three agent
//! containers succeeds; stopping one agent container fails a running job the
//! way the failure model says (the node is lost after the TTL, the other
//! nodes' processes are stopped). Skipped, saying so, where Docker or
//! docker-compose is missing. Uses the binaries in target/debug.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cohort_tests::{SparePort, repo_root};

struct Compose {
    project: String,
    net: String,
    http_port: u16,
}

impl Compose {
    fn file() -> PathBuf {
        repo_root().join("deploy/compose/docker-compose.yml")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("COMPOSE_PROJECT_NAME", &self.project)
            .env("COHORT_NET", &self.net)
            .env("COHORT_HTTP_PORT", self.http_port.to_string())
            .env("COHORT_IMAGE", "cohort-local:test");
        c
    }

    fn compose(&self, args: &[&str]) -> Output {
        self.command("docker-compose").arg("-f").arg(Self::file()).args(args).output().unwrap()
    }

    /// `cohort ARGS` inside controller-1 (its environment has the CA, token and URLs).
    fn cohort(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", "-T", "controller-1", "cohort"];
        all.extend_from_slice(args);
        self.compose(&all)
    }

    fn job(&self, id: &str) -> serde_json::Value {
        let out = self.cohort(&["status", id, "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    fn wait_job(&self, id: &str, within: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id);
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} not as expected within {within:?}: {job}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--tail", "40"]);
            eprintln!("{}", String::from_utf8_lossy(&logs.stdout));
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
        let _ = Command::new("docker").args(["image", "rm", "-f", "cohort-local:test"]).output();
    }
}

fn docker_available() -> Result<(), String> {
    let docker = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    match docker {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(format!("docker info failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => return Err(format!("no docker: {e}")),
    }
    match Command::new("docker-compose").arg("version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("no docker-compose".into()),
    }
}

fn state(job: &serde_json::Value) -> &str {
    job["state"].as_str().unwrap_or("")
}

fn live(job: &serde_json::Value) -> u64 {
    job["live_processes"].as_u64().unwrap_or(0)
}

#[test]
fn a_job_runs_across_three_agent_containers_and_a_stopped_agent_fails_it() {
    if let Err(why) = docker_available() {
        eprintln!("SKIPPED: the compose cluster test needs Docker and docker-compose ({why})");
        return;
    }
    let http = SparePort::take();
    let compose = Compose {
        project: format!("cohorttest{}", std::process::id()),
        net: format!("10.213.{}", 100 + std::process::id() % 150),
        http_port: http.port,
    };
    let started = Instant::now();
    let up = compose
        .command("bash")
        .arg(repo_root().join("deploy/compose/up.sh"))
        .env("COHORT_SKIP_BUILD", "1")
        .env("COHORT_BIN_DIR", cohort_tests::bin_dir())
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "up.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    eprintln!(
        "figures: compose cluster up (image build, 8 containers, 3 nodes Ready) in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // A job across the three containers: each node its own host name and
    // address; rank 0 is reached over the containers' network.
    let out = compose.cohort(&["submit", "/jobs/hello.yaml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hello = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let job = compose.wait_job(&hello, Duration::from_secs(60), |j| {
        matches!(state(j), "Succeeded" | "Failed" | "Cancelled") && live(j) == 0
    });
    assert_eq!(state(&job), "Succeeded", "{job}");
    let logs = String::from_utf8(compose.cohort(&["logs", "hello"]).stdout).unwrap();
    for (i, rank) in [(1, 0), (2, 1), (3, 2)] {
        let line = format!("node-{i}/0 | node {rank} of 3 on node-{i}, master {}.21:", compose.net);
        assert!(logs.contains(&line), "missing {line:?} in:\n{logs}");
    }
    assert!(logs.contains("rank 0: both peers reached"), "{logs}");

    // A running job; then one agent container is stopped.
    let out = compose.cohort(&["submit", "/jobs/long.yaml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    compose.wait_job(&id, Duration::from_secs(60), |j| state(j) == "Running");
    let stop = compose.compose(&["stop", "-t", "15", "agent-2"]);
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    let job = compose.wait_job(&id, Duration::from_secs(60), |j| state(j) == "Failed" && live(j) == 0);
    let reason = job["reason"].as_str().unwrap_or("");
    assert!(reason.contains("node-2"), "the failure names the stopped node: {job}");
    for process in job["processes"].as_array().unwrap() {
        if process["node_name"] != "node-2" {
            assert_eq!(process["phase"], "Exited", "the other nodes' processes were stopped: {job}");
        }
    }
    // Nothing of the job is left in the surviving containers.
    for agent in ["agent-1", "agent-3"] {
        let ps = String::from_utf8(compose.compose(&["exec", "-T", agent, "ps"]).stdout).unwrap();
        assert!(!ps.contains("while true"), "{agent} still runs the job:\n{ps}");
    }
    let nodes = String::from_utf8(compose.cohort(&["nodes"]).stdout).unwrap();
    assert!(nodes.lines().any(|l| l.contains("node-2") && l.contains("Lost")), "{nodes}");
    eprintln!("figures: compose test done in {:.1}s", started.elapsed().as_secs_f64());
}
