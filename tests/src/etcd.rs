//! Real etcd clusters for tests: `etcd` processes (Debian's `etcd-server`, or
//! `$COHORT_ETCD_BIN`) on loopback ports, each member with a temporary data dir.
//!
//! Only std, nix and tempfile: cohort-controller's own tests compile this very
//! file with `#[path = "../../tests/src/etcd.rs"] mod etcd_cluster;`.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// Ports per cluster: a client and a peer port for up to 5 members.
const BLOCK: u16 = 10;
/// 28000-31999: below the ephemeral range, apart from the other test port blocks (20000-27999).
const FIRST_PORT: u16 = 28000;
const BLOCKS: u16 = 400;
const MAX_MEMBERS: usize = (BLOCK / 2) as usize;

/// A block of ports held for one cluster, locked across test processes.
struct EtcdPorts {
    _lock: Flock<File>,
    base: u16,
}

impl EtcdPorts {
    fn take() -> EtcdPorts {
        for i in 0..BLOCKS {
            let base = FIRST_PORT + i * BLOCK;
            let path = std::env::temp_dir().join(format!("cohort-etcd-ports-{base}.lock"));
            let Ok(file) = File::create(&path) else { continue };
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { continue };
            // Something outside the tests may hold one of them.
            if (base..base + BLOCK).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
                return EtcdPorts { _lock: lock, base };
            }
        }
        panic!("no free etcd test port block in {FIRST_PORT}-{}", FIRST_PORT + BLOCKS * BLOCK - 1);
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    _ports: EtcdPorts,
}

fn etcd_bin() -> String {
    std::env::var("COHORT_ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

impl EtcdCluster {
    /// Starts `members` etcd processes as one new cluster and waits until every
    /// member reports healthy.
    pub fn start(members: usize) -> EtcdCluster {
        assert!((1..=MAX_MEMBERS).contains(&members), "1 to {MAX_MEMBERS} members, not {members}");
        let ports = EtcdPorts::take();
        let dir = tempfile::Builder::new().prefix("cohort-etcd-").tempdir().unwrap();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let token = format!("cohort-test-{}-{}-{nanos}", std::process::id(), ports.base);
        let members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports.base + 2 * i as u16,
                peer_port: ports.base + 2 * i as u16 + 1,
                process: None,
            })
            .collect();
        let mut cluster = EtcdCluster { dir, token, members, _ports: ports };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i, Duration::from_secs(30));
        }
        cluster
    }

    /// `http://127.0.0.1:<port>` of every member, dead or alive.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, member: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[member].client_port)
    }

    /// `etcd://127.0.0.1:<port>,...`, as `--store` takes it.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect();
        format!("etcd://{}", hosts.join(","))
    }

    pub fn log(&self, member: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[member].name))
    }

    /// SIGKILLs a member and waits until it is gone.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut process) = self.members[member].process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts a killed member again on its data dir and waits until it is healthy.
    pub fn restart(&mut self, member: usize) {
        self.kill(member);
        self.spawn(member);
        self.wait_healthy(member, Duration::from_secs(30));
    }

    /// Whether the member answers `/health` with `true` (it is up and sees a raft leader).
    pub fn is_healthy(&self, member: usize) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[member].client_port));
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }

    /// Polls `/health` until the member is healthy; panics with its log after `within`.
    pub fn wait_healthy(&self, member: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.is_healthy(member) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log(member)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                panic!(
                    "etcd member {member} not healthy within {within:?}; last lines of {}:\n{}",
                    self.log(member).display(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let log = File::options().create(true).append(true).open(self.log(i)).unwrap();
        let process = Command::new(etcd_bin())
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?}: {e}; install etcd (Debian: apt-get install etcd-server) or set COHORT_ETCD_BIN",
                    etcd_bin()
                )
            });
        self.members[i].process = Some(process);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
