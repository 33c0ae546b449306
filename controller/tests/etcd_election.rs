//! Leader election through etcd, against real etcd processes.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/src/etcd.rs"]
mod etcd_cluster;

use std::time::Duration;

use cohort_controller::leader::{self, LeaderState};
use etcd_client::{Client, GetOptions};
use etcd_cluster::EtcdCluster;
use tokio::sync::watch;
use tokio::time::Instant;

/// Short, to keep the tests quick; etcd's minimum with its default timings is 2 s.
const TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/cohort-test/";

struct Campaigner {
    id: String,
    state: watch::Receiver<LeaderState>,
    shutdown: watch::Sender<bool>,
}

async fn campaign(cluster: &EtcdCluster, id: &str, ttl: Duration) -> Campaigner {
    let (shutdown, stop) = watch::channel(false);
    let url = format!("http://{id}.test:7070");
    let state = leader::etcd(&cluster.endpoints(), PREFIX, id, &url, ttl, stop).await.unwrap();
    Campaigner { id: id.to_string(), state, shutdown }
}

/// Waits (on state changes, not sleeps) until `done` holds; returns how long it took.
async fn wait_for(c: &mut Campaigner, within: Duration, what: &str, done: impl Fn(&LeaderState) -> bool) -> Duration {
    let started = Instant::now();
    let result = tokio::time::timeout(within, c.state.wait_for(|s| done(s))).await.map(|r| r.map(|_| ()));
    match result {
        Ok(Ok(_)) => started.elapsed(),
        Ok(Err(_)) => panic!("{}: election task ended before: {what}", c.id),
        Err(_) => panic!("{}: not within {within:?}: {what}; state {:?}", c.id, *c.state.borrow()),
    }
}

async fn leads(c: &mut Campaigner, within: Duration) -> Duration {
    wait_for(c, within, "leads", |s| s.is_leader).await
}

async fn follows(c: &mut Campaigner, leader: &str, within: Duration) -> Duration {
    let leader = leader.to_string();
    let url = format!("http://{leader}.test:7070");
    wait_for(c, within, &format!("follows {leader}"), move |s| {
        !s.is_leader && s.leader_id == leader && s.leader_url == url
    })
    .await
}

/// A leader and a standby that knows it.
async fn leader_and_standby(cluster: &EtcdCluster, ttl: Duration) -> (Campaigner, Campaigner) {
    let mut a = campaign(cluster, "a", ttl).await;
    leads(&mut a, Duration::from_secs(10)).await;
    let mut b = campaign(cluster, "b", ttl).await;
    follows(&mut b, "a", Duration::from_secs(10)).await;
    assert!(a.state.borrow().is_leader);
    (a, b)
}

#[tokio::test]
async fn two_campaigners_exactly_one_leads() {
    let cluster = EtcdCluster::start(1);
    let mut a = campaign(&cluster, "a", TTL).await;
    let mut b = campaign(&cluster, "b", TTL).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (winner, loser) = loop {
        let leading = (a.state.borrow().is_leader, b.state.borrow().is_leader);
        match leading {
            (true, true) => panic!("both lead"),
            (true, false) => break ("a", &mut b),
            (false, true) => break ("b", &mut a),
            (false, false) => assert!(Instant::now() < deadline, "nobody leads"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    follows(loser, winner, Duration::from_secs(5)).await;
    // And it stays that way across several lease renewals.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        let leading = [&a, &b].iter().filter(|c| c.state.borrow().is_leader).count();
        assert_eq!(leading, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leader's process dies without resigning: the standby leads once the lease runs out.
#[tokio::test]
async fn crashed_leader_is_replaced_within_ttl() {
    let cluster = EtcdCluster::start(1);
    // A's own runtime stands for its process: shutting it down drops its tasks and connections.
    let process = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (endpoints, (_a_shutdown, stop)) = (cluster.endpoints(), watch::channel(false));
    let mut a_state = process
        .spawn(async move { leader::etcd(&endpoints, PREFIX, "a", "http://a.test:7070", TTL, stop).await.unwrap() })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), a_state.wait_for(|s| s.is_leader)).await.unwrap().unwrap();
    let mut b = campaign(&cluster, "b", TTL).await;
    follows(&mut b, "a", Duration::from_secs(10)).await;

    process.shutdown_background();
    let took = leads(&mut b, TTL + Duration::from_secs(1)).await;
    eprintln!("crashed leader: standby led after {took:?} (TTL {TTL:?})");
}

/// The leader's lease is revoked behind its back: the standby leads at once,
/// and the old leader steps down.
#[tokio::test]
async fn revoked_lease_hands_over() {
    let cluster = EtcdCluster::start(1);
    let (mut a, mut b) = leader_and_standby(&cluster, TTL).await;
    let mut etcd = Client::connect(cluster.endpoints(), None).await.unwrap();
    let candidates = etcd.get(format!("{PREFIX}leader/"), Some(GetOptions::new().with_prefix())).await.unwrap();
    let a_lease = candidates.kvs().iter().find(|kv| kv.value().starts_with(b"a ")).expect("a's election key").lease();

    etcd.lease_revoke(a_lease).await.unwrap();
    let b_took = leads(&mut b, TTL + Duration::from_secs(1)).await;
    let a_took = wait_for(&mut a, TTL, "steps down", |s| !s.is_leader).await;
    eprintln!("revoked lease: standby led after {b_took:?}, old leader stepped down after {a_took:?}");
    follows(&mut a, "b", Duration::from_secs(5)).await;
}

/// A graceful stop resigns: the standby leads without waiting for the TTL.
#[tokio::test]
async fn resign_hands_over_at_once() {
    let cluster = EtcdCluster::start(1);
    let ttl = Duration::from_secs(10);
    let (mut a, mut b) = leader_and_standby(&cluster, ttl).await;
    a.shutdown.send(true).unwrap();
    let a_took = wait_for(&mut a, Duration::from_secs(1), "steps down", |s| !s.is_leader).await;
    let b_took = leads(&mut b, Duration::from_secs(1)).await;
    eprintln!("resign: old leader stepped down after {a_took:?}, standby led after {b_took:?} (TTL {ttl:?})");
}

/// A leader cut off from etcd stops leading before its lease could run out.
#[tokio::test]
async fn leader_without_etcd_steps_down_within_ttl() {
    let mut cluster = EtcdCluster::start(1);
    let mut a = campaign(&cluster, "a", TTL).await;
    leads(&mut a, Duration::from_secs(10)).await;
    cluster.kill(0);
    let took = wait_for(&mut a, TTL, "steps down", |s| !s.is_leader).await;
    eprintln!("etcd gone: leader stepped down after {took:?} (TTL {TTL:?})");
    // etcd back: it campaigns again and wins.
    cluster.restart(0);
    leads(&mut a, Duration::from_secs(15)).await;
}

/// Losing one of three etcd members, even the raft leader, does not move leadership.
#[tokio::test]
async fn leader_rides_out_a_dead_etcd_member() {
    let mut cluster = EtcdCluster::start(3);
    let ttl = leader::DEFAULT_TTL;
    let (mut a, b) = leader_and_standby(&cluster, ttl).await;
    let mut raft_leader = None;
    for (i, endpoint) in cluster.endpoints().iter().enumerate() {
        let status = Client::connect([endpoint], None).await.unwrap().status().await.unwrap();
        if status.header().map(|h| h.member_id()) == Some(status.leader()) {
            raft_leader = Some(i);
        }
    }
    cluster.kill(raft_leader.expect("a raft leader"));
    // Several renewals' worth, with the failover of etcd's own leader inside.
    let steady = tokio::time::timeout(ttl * 2, a.state.wait_for(|s| !s.is_leader)).await.map(|r| r.map(|_| ()));
    assert!(steady.is_err(), "leader stepped down: {:?}", *a.state.borrow());
    assert!(!b.state.borrow().is_leader);
}
