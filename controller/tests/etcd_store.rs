//! `EtcdStore` against real etcd processes (started here, on loopback ports).
#![allow(clippy::unwrap_used)]

#[path = "../../tests/src/etcd.rs"]
mod etcd_cluster;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cohort_controller::store::{
    Batching, CommitError, DEFAULT_MAX_TXN_OPS, EmbeddedStore, EtcdOptions, EtcdStore, Expect, Op, Store, StoreError,
    StoreWriter, Versioned, WatchEvent, WatchStream, conformance,
};
use etcd_client::Client;
use etcd_cluster::EtcdCluster;
use futures::StreamExt;
use tokio::time::Instant;

async fn store(endpoints: Vec<String>) -> EtcdStore {
    EtcdStore::connect_with(EtcdOptions { prefix: "/cohort-test/".into(), ..EtcdOptions::new(endpoints) })
        .await
        .unwrap()
}

async fn next_event(events: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("no watch event within 15 s")
        .expect("watch stream ended")
}

/// The member that is the raft leader now.
async fn raft_leader(cluster: &EtcdCluster) -> usize {
    for (i, endpoint) in cluster.endpoints().iter().enumerate() {
        let mut client = Client::connect([endpoint], None).await.unwrap();
        let status = client.status().await.unwrap();
        if status.header().map(|h| h.member_id()) == Some(status.leader()) {
            return i;
        }
    }
    panic!("no member is the raft leader");
}

#[tokio::test]
async fn conformance_suite() {
    let cluster = EtcdCluster::start(1);
    conformance::run_all(&store(cluster.endpoints()).await).await;
}

/// A commit of more keys than etcd's `--max-txn-ops`, or of more bytes than
/// its `--max-request-bytes` allows, is refused before it is sent, naming the
/// limit; the writer splits a bigger batch into commits etcd takes, and a key
/// someone else wrote fails alone.
#[tokio::test]
async fn commits_stay_within_etcd_limits_and_a_foreign_write_fails_alone() {
    let cluster = EtcdCluster::start(1);
    let store = Arc::new(store(cluster.endpoints()).await);
    let too_many = (0..=DEFAULT_MAX_TXN_OPS).map(|i| Op::put(format!("nodes/n{i}"), vec![], Expect::Any)).collect();
    let too_big = (0..8).map(|i| Op::put(format!("jobs/j{i}"), vec![0; 200 << 10], Expect::Any)).collect();
    for (ops, named) in [(too_many, "129 keys (at most 128)"), (too_big, "--max-request-bytes")] {
        match store.commit(ops).await {
            Err(CommitError::Store(e)) => assert!(e.to_string().contains(named), "{e}"),
            other => panic!("expected the limit named, got {other:?}"),
        }
    }
    assert!(store.list("").await.unwrap().is_empty());

    // Job-sized records, more than etcd takes in one request: each is stored.
    let writer = StoreWriter::start(store.clone(), HashMap::new());
    let jobs: Vec<_> = (0..12).map(|i| writer.write(format!("jobs/j{i}"), Some(vec![i; 200 << 10]))).collect();
    for durable in jobs {
        durable.wait().await.unwrap();
    }
    assert_eq!(store.list("jobs/").await.unwrap().len(), 12);

    let keys: Vec<String> = (0..300).map(|i| format!("nodes/n{i:03}")).collect();
    let created: Vec<_> = keys.iter().map(|k| writer.write(k.clone(), Some(vec![1; 1024]))).collect();
    let mut revisions = Vec::new();
    for durable in created {
        revisions.push(durable.wait().await.unwrap());
    }
    for (key, revision) in keys.iter().zip(&revisions) {
        assert_eq!(store.get(key).await.unwrap().unwrap().revision, *revision, "{key}");
    }

    let foreign = store.put(&keys[200], b"theirs".to_vec(), Expect::Any).await.unwrap();
    let updated: Vec<_> = keys.iter().map(|k| writer.write(k.clone(), Some(vec![2; 1024]))).collect();
    for (key, durable) in keys.iter().zip(updated) {
        match durable.wait().await {
            Ok(_) if *key != keys[200] => assert_eq!(store.get(key).await.unwrap().unwrap().value, [2; 1024]),
            Err(StoreError::Conflict { key: k, found, .. }) if k == keys[200] => assert_eq!(found, Some(foreign)),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(store.get(&keys[200]).await.unwrap().unwrap().value, b"theirs");
}

/// Figures, not a check: 1,024 node-sized records (1 KiB) queued at once
/// (as a 1,024-node gang's changes are) through one `StoreWriter` each way:
/// one put per key (how batches were written before) against batched
/// commits, on one etcd member on loopback and on the embedded store. Rounds
/// alternate between the two ways; the first creates the keys, the rest
/// update them.
///
/// `cargo test -p cohort-controller --test etcd_store -- --ignored --nocapture writer_figures`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn writer_figures() {
    const RECORDS: usize = 1024;
    const ROUNDS: usize = 6;
    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ways = [Batching::PerKey, Batching::Commits];
    for backend in ["etcd", "embedded"] {
        let mut writers = Vec::new();
        for way in ways {
            let store: Arc<dyn Store> = if backend == "etcd" {
                let options =
                    EtcdOptions { prefix: format!("/figures-{way:?}/"), ..EtcdOptions::new(cluster.endpoints()) };
                Arc::new(EtcdStore::connect_with(options).await.unwrap())
            } else {
                Arc::new(EmbeddedStore::open(&dir.path().join(format!("{way:?}"))).unwrap())
            };
            writers.push(StoreWriter::start_with(store, HashMap::new(), way));
        }
        let mut took: Vec<Vec<Duration>> = vec![Vec::new(); ways.len()];
        for round in 0..ROUNDS {
            for (writer, took) in writers.iter().zip(&mut took) {
                let started = Instant::now();
                let durables: Vec<_> = (0..RECORDS)
                    .map(|i| writer.write(format!("nodes/n{i:04}"), Some(vec![round as u8; 1024])))
                    .collect();
                for durable in durables {
                    durable.wait().await.unwrap();
                }
                took.push(started.elapsed());
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let median = |took: &[Duration]| {
            let mut updates = took[1..].to_vec();
            updates.sort();
            updates[updates.len() / 2]
        };
        eprintln!("{RECORDS} records of 1 KiB through StoreWriter, {backend} store, {ROUNDS} rounds each way:");
        for (way, took) in ways.iter().zip(&took) {
            let all: Vec<String> = took.iter().map(|d| format!("{:.0}", ms(*d))).collect();
            eprintln!(
                "  {way:?}: create {:.1} ms, update median {:.1} ms (every round, ms: {})",
                ms(took[0]),
                ms(median(took)),
                all.join(" ")
            );
        }
        eprintln!(
            "  per-key / batched: create {:.1}x, update {:.1}x",
            ms(took[0][0]) / ms(took[1][0]),
            ms(median(&took[0])) / ms(median(&took[1]))
        );
    }
}

#[tokio::test]
async fn endpoints_from_url() {
    let cluster = EtcdCluster::start(1);
    let options = EtcdOptions::from_url(&cluster.url()).unwrap();
    assert_eq!(options.endpoints, cluster.endpoints());
    let store = EtcdStore::connect_with(options).await.unwrap();
    assert_eq!(store.prefix(), "/cohort/");
    let rev = store.put("jobs/x", b"x".to_vec(), Expect::Absent).await.unwrap();
    let raw = store.client().clone().get("/cohort/jobs/x", None).await.unwrap();
    assert_eq!(raw.kvs()[0].mod_revision() as u64, rev, "keys are <prefix><key>");
}

#[tokio::test]
async fn unreachable_cluster_is_a_clear_error() {
    let mut cluster = EtcdCluster::start(1);
    cluster.kill(0);
    let started = Instant::now();
    let err = EtcdStore::connect(&cluster.endpoints(), "/cohort/").await.err().expect("connect must fail");
    assert!(err.to_string().contains(&cluster.endpoint(0)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "gave up after {:?}", started.elapsed());
}

/// A 3-member cluster loses its raft leader while a client keeps working: the
/// client sees no error, and every write is there afterwards.
#[tokio::test]
async fn member_killed_under_load_is_invisible() {
    let mut cluster = EtcdCluster::start(3);
    let store = Arc::new(store(cluster.endpoints()).await);
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (store, done) = (store.clone(), done.clone());
        async move {
            let mut errors = Vec::new();
            let mut written: BTreeMap<String, Versioned> = BTreeMap::new();
            let mut slowest = Duration::ZERO;
            for i in 0..200 {
                let started = Instant::now();
                let key = format!("jobs/{}", i % 10);
                let value = format!("value {i}").into_bytes();
                let expect = written.get(&key).map_or(Expect::Absent, |v| Expect::Revision(v.revision));
                match store.put(&key, value.clone(), expect).await {
                    Ok(revision) => {
                        written.insert(key.clone(), Versioned { value: value.clone(), revision });
                    }
                    Err(e) => errors.push(format!("put {key} #{i}: {e}")),
                }
                match store.get(&key).await {
                    Ok(got) if got.as_ref() == written.get(&key) => {}
                    Ok(got) => errors.push(format!("get {key} #{i}: {got:?}, wrote {:?}", written.get(&key))),
                    Err(e) => errors.push(format!("get {key} #{i}: {e}")),
                }
                if i % 10 == 9 {
                    match store.list("jobs/").await {
                        Ok(list) if list.len() == written.len() => {}
                        Ok(list) => errors.push(format!("list #{i}: {} keys, wrote {}", list.len(), written.len())),
                        Err(e) => errors.push(format!("list #{i}: {e}")),
                    }
                }
                slowest = slowest.max(started.elapsed());
                done.fetch_add(1, Ordering::SeqCst);
            }
            (errors, written, slowest)
        }
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::SeqCst) < 50 {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let leader = raft_leader(&cluster).await;
    cluster.kill(leader);
    eprintln!("killed member {leader} (the raft leader) after {} iterations", done.load(Ordering::SeqCst));

    let (errors, written, slowest) = load.await.unwrap();
    eprintln!("slowest iteration: {slowest:?}");
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
    assert_eq!(written.len(), 10);
    for (key, value) in &written {
        assert_eq!(store.get(key).await.unwrap().as_ref(), Some(value), "{key}");
    }
    // The killed member comes back and catches up.
    cluster.restart(leader);
    let revived = self::store(vec![cluster.endpoint(leader)]).await;
    let listed: BTreeMap<String, Versioned> = revived.list("jobs/").await.unwrap().into_iter().collect();
    assert_eq!(listed, written);
}

/// etcd 3.4 leaves a watch that is in place alone when history is compacted:
/// the cases that lose events are a watch (re-)opened at a compacted revision.
#[tokio::test]
async fn watch_from_compacted_revision_resyncs() {
    let cluster = EtcdCluster::start(1);
    let store = store(cluster.endpoints()).await;
    let mut live = store.watch("jobs/", 0).await.unwrap();
    let r1 = store.put("jobs/a", b"1".to_vec(), Expect::Any).await.unwrap();
    let r2 = store.put("jobs/b", b"2".to_vec(), Expect::Any).await.unwrap();
    store.client().clone().compact(r2 as i64, None).await.unwrap();

    // Asking for history that is gone: Resync first, then new changes.
    let mut late = store.watch("jobs/", r1).await.unwrap();
    assert_eq!(next_event(&mut late).await, WatchEvent::Resync);
    let r3 = store.put("jobs/c", b"3".to_vec(), Expect::Any).await.unwrap();
    let put_c = WatchEvent::Put { key: "jobs/c".into(), value: b"3".to_vec(), revision: r3 };
    assert_eq!(next_event(&mut late).await, put_c);

    // The watch that was in place saw everything, without a Resync.
    for expected in [
        WatchEvent::Put { key: "jobs/a".into(), value: b"1".to_vec(), revision: r1 },
        WatchEvent::Put { key: "jobs/b".into(), value: b"2".to_vec(), revision: r2 },
        put_c,
    ] {
        assert_eq!(next_event(&mut live).await, expected);
    }
}

/// The watch's member dies; meanwhile the keys change and history is
/// compacted; the member comes back: the watch re-opens by itself, finds its
/// next revision compacted, and says Resync before the next change.
#[tokio::test]
async fn broken_watch_reopens_and_resyncs_after_compaction() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let watcher = store(vec![endpoints[0].clone()]).await;
    let writer = store(endpoints[1..].to_vec()).await;
    let mut events = watcher.watch("jobs/", 0).await.unwrap();
    let r1 = writer.put("jobs/a", b"1".to_vec(), Expect::Any).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Put { key: "jobs/a".into(), value: b"1".to_vec(), revision: r1 }
    );

    cluster.kill(0);
    writer.put("jobs/b", b"missed".to_vec(), Expect::Any).await.unwrap();
    let r3 = writer.put("jobs/c", b"missed".to_vec(), Expect::Any).await.unwrap();
    writer.client().clone().compact(r3 as i64, None).await.unwrap();
    cluster.restart(0);

    assert_eq!(next_event(&mut events).await, WatchEvent::Resync);
    let r4 = writer.put("jobs/d", b"4".to_vec(), Expect::Any).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Put { key: "jobs/d".into(), value: b"4".to_vec(), revision: r4 }
    );
}

/// A watch whose member dies moves to another member and loses nothing.
#[tokio::test]
async fn broken_watch_resumes_without_loss() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let watcher = store(endpoints[..2].to_vec()).await;
    let writer = store(vec![endpoints[2].clone()]).await;
    let mut events = watcher.watch("jobs/", 0).await.unwrap();
    // One of the two kills hits the member the watch is on.
    for (round, member) in [0, 1].into_iter().enumerate() {
        cluster.kill(member);
        let key = format!("jobs/{round}");
        let revision = writer.put(&key, vec![], Expect::Any).await.unwrap();
        assert_eq!(next_event(&mut events).await, WatchEvent::Put { key, value: vec![], revision });
        cluster.restart(member);
    }
}
