//! The controller's durable state, behind one `Store` trait: an embedded,
//! persistent store for a single machine (the default) and etcd (several
//! controllers, high availability).
//!
//! Keys are plain strings (`jobs/<id>`, `nodes/<name>`); values are encoded
//! protobuf records. Every key carries a revision so that writers can make
//! compare-and-set updates: two controllers can never both move a job.

mod embedded;
pub(crate) mod etcd;
mod writer;

pub use embedded::EmbeddedStore;
pub use etcd::{
    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS, DEFAULT_PREFIX, EtcdOptions, EtcdStore, parse_endpoints,
};
pub use writer::{Batching, Durable, StoreWriter};

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

/// A value and the revision it was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// What a conditional write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// The key must not exist yet.
    Absent,
    /// The key must be at exactly this revision.
    Revision(u64),
}

impl Expect {
    /// Whether a key at `found` (`None`: absent) meets this expectation.
    pub fn holds(self, found: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Revision(r) => found == Some(r),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store conflict on {key}: expected {expected:?}, found revision {found:?}")]
    Conflict { key: String, expected: Expect, found: Option<u64> },
    #[error("store backend error: {0}")]
    Backend(String),
    /// The embedded store's file cannot be written (disk full, I/O error); it
    /// reopens itself in the background and works again once it can write.
    #[error(
        "the controller's store cannot write: {error}; free space on {dir} (or fix the disk): it recovers by itself"
    )]
    Unwritable { error: String, dir: String },
    /// The embedded store's file holds a page redb cannot read; the store
    /// reopens it (redb repairs what it can) and works again if that helps.
    #[error(
        "the controller's state file {file} is damaged: {error}; the controller reopens it until redb repairs it. \
         If it stays so, stop the controller and restore {file} from a backup, or move it aside \
         (mv {file} {file}.corrupt) and start again with no jobs and no nodes"
    )]
    Damaged { error: String, file: String },
}

/// One write of a [`Store::commit`]: `value` under `key` (`None`: delete it)
/// if `expect` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub expect: Expect,
}

impl Op {
    pub fn put(key: impl Into<String>, value: Vec<u8>, expect: Expect) -> Op {
        Op { key: key.into(), value: Some(value), expect }
    }

    pub fn delete(key: impl Into<String>, expect: Expect) -> Op {
        Op { key: key.into(), value: None, expect }
    }

    /// What the op counts against [`CommitLimits::bytes`]: its key and value.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// The most one [`Store::commit`] takes: ops, and bytes ([`Op::size`]) in
/// all unless it is one op (an op bigger than that is refused only if the
/// store refuses it from `put`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitLimits {
    pub ops: usize,
    pub bytes: usize,
}

impl CommitLimits {
    /// Why `ops` is more than these limits take, if it is.
    fn exceeded_by(&self, ops: &[Op]) -> Option<String> {
        let bytes: usize = ops.iter().map(Op::size).sum();
        if ops.len() > self.ops {
            Some(format!("{} keys (at most {})", ops.len(), self.ops))
        } else if ops.len() > 1 && bytes > self.bytes {
            Some(format!("{bytes} bytes of keys and values (at most {})", self.bytes))
        } else {
            None
        }
    }
}

/// Why a [`Store::commit`] wrote nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The expectation of op `index` did not hold (`error` is a
    /// [`StoreError::Conflict`] naming its key); nothing was written.
    #[error("op {index} of the commit: {error}")]
    Conflict { index: usize, error: StoreError },
    /// The store failed (for etcd: whether the commit was applied is unknown,
    /// as for any write whose answer was lost).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses a commit that names a key twice (etcd refuses such a transaction).
fn check_distinct_keys(ops: &[Op]) -> Result<(), CommitError> {
    let mut seen = std::collections::HashSet::new();
    match ops.iter().find(|op| !seen.insert(op.key.as_str())) {
        Some(op) => Err(CommitError::Store(StoreError::Backend(format!(
            "a store commit names key {:?} twice; write each key once per commit",
            op.key
        )))),
        None => Ok(()),
    }
}

/// Whether the store can be used now, for `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Writes fail until this clears; the message names the error and the fix.
    Failing(String),
}

/// One change seen by a [`Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        revision: u64,
    },
    Delete {
        key: String,
        revision: u64,
    },
    /// Changes may have been missed (history compacted, the watcher fell
    /// behind): re-list the prefix, then keep consuming the stream.
    Resync,
}

/// Changes under a prefix, in revision order. Ends only when the store is dropped.
pub type WatchStream = Pin<Box<dyn Stream<Item = WatchEvent> + Send>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Writes `value` if `expect` holds; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError>;
    async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError>;
    /// Makes every op (each key at most once, within
    /// [`Store::commit_limits`]) if every expectation holds, and
    /// none otherwise. All of them get one new revision, returned once per
    /// op: a put's is its key's revision from then on, as [`Store::put`]'s;
    /// a delete's is the revision it was deleted at.
    ///
    /// Both backends make it one transaction. This default, for test
    /// wrappers that forward `put` and `delete`, checks the expectations
    /// then writes one op after another (each with its own revision, 0 for
    /// a delete): it is all or nothing only while nobody else writes these keys.
    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<u64>, CommitError> {
        check_distinct_keys(&ops)?;
        for (index, op) in ops.iter().enumerate() {
            let found = self.get(&op.key).await?.map(|v| v.revision);
            if !op.expect.holds(found) {
                let error = StoreError::Conflict { key: op.key.clone(), expected: op.expect, found };
                return Err(CommitError::Conflict { index, error });
            }
        }
        let mut revisions = Vec::with_capacity(ops.len());
        for op in ops {
            revisions.push(match op.value {
                Some(value) => self.put(&op.key, value, op.expect).await?,
                None => {
                    self.delete(&op.key, op.expect).await?;
                    0
                }
            });
        }
        Ok(revisions)
    }
    /// The most one [`Store::commit`] takes.
    fn commit_limits(&self) -> CommitLimits {
        CommitLimits { ops: usize::MAX, bytes: usize::MAX }
    }
    /// Changes to keys starting with `prefix` from `from_revision` on (0: from
    /// now). The watch is in place when this returns, so a write made after it
    /// is seen. Open it before listing, so nothing falls between the list and
    /// the first event; a backend that cannot replay an older `from_revision`
    /// yields [`WatchEvent::Resync`] first.
    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError>;
    /// Whether the store works now. A backend whose failures are per call
    /// (etcd: each call is retried or fails on its own) is always `Ok`.
    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }
}

/// The behaviour every `Store` must have; run against each backend (the etcd
/// one from `controller/tests/etcd_store.rs`, hence public).
#[doc(hidden)]
pub mod conformance {
    #![allow(clippy::unwrap_used, clippy::missing_panics_doc)]
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    /// Every case below, on a store whose keyspace is empty.
    pub async fn run_all(store: &dyn Store) {
        kv(store).await;
        commit(store).await;
        watch(store).await;
    }

    async fn next_event(events: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("no watch event within 10 s")
            .expect("watch stream ended")
    }

    pub async fn kv(store: &dyn Store) {
        assert_eq!(store.get("jobs/a").await.unwrap(), None);

        let r1 = store.put("jobs/a", b"one".to_vec(), Expect::Absent).await.unwrap();
        let got = store.get("jobs/a").await.unwrap().unwrap();
        assert_eq!(got, Versioned { value: b"one".to_vec(), revision: r1 });

        // A second create of the same key must be refused.
        let err = store.put("jobs/a", b"two".to_vec(), Expect::Absent).await;
        assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");

        // Compare-and-set: only the holder of the current revision may write.
        let r2 = store.put("jobs/a", b"two".to_vec(), Expect::Revision(r1)).await.unwrap();
        assert!(r2 > r1);
        let stale = store.put("jobs/a", b"three".to_vec(), Expect::Revision(r1)).await;
        assert!(matches!(stale, Err(StoreError::Conflict { found: Some(f), .. }) if f == r2));
        assert_eq!(store.get("jobs/a").await.unwrap().unwrap().value, b"two");

        store.put("jobs/b", b"b".to_vec(), Expect::Any).await.unwrap();
        store.put("nodes/n1", b"n".to_vec(), Expect::Any).await.unwrap();
        let jobs = store.list("jobs/").await.unwrap();
        let keys: Vec<&str> = jobs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["jobs/a", "jobs/b"]);

        // Revision 0 is no key's revision: it never matches, not even an absent key.
        let zero = store.put("jobs/z", b"z".to_vec(), Expect::Revision(0)).await;
        assert!(matches!(zero, Err(StoreError::Conflict { found: None, .. })), "{zero:?}");
        assert_eq!(store.get("jobs/z").await.unwrap(), None);

        let wrong = store.delete("jobs/a", Expect::Revision(r1)).await;
        assert!(matches!(wrong, Err(StoreError::Conflict { .. })));
        store.delete("jobs/a", Expect::Revision(r2)).await.unwrap();
        assert_eq!(store.get("jobs/a").await.unwrap(), None);
        assert_eq!(store.list("jobs/").await.unwrap().len(), 1);
    }

    fn conflict_at(result: Result<Vec<u64>, CommitError>) -> (usize, String, Option<u64>) {
        match result {
            Err(CommitError::Conflict { index, error: StoreError::Conflict { key, found, .. } }) => (index, key, found),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    pub async fn commit(store: &dyn Store) {
        assert_eq!(store.commit(Vec::new()).await.unwrap(), Vec::<u64>::new());

        // Every op of a commit gets the commit's one revision, which later gets see.
        let created = store
            .commit(vec![
                Op::put("batch/a", b"a1".to_vec(), Expect::Absent),
                Op::put("batch/b", b"b1".to_vec(), Expect::Any),
            ])
            .await
            .unwrap();
        let r1 = created[0];
        assert_eq!(created, [r1, r1]);
        assert_eq!(store.get("batch/a").await.unwrap(), Some(Versioned { value: b"a1".to_vec(), revision: r1 }));
        assert_eq!(store.get("batch/b").await.unwrap(), Some(Versioned { value: b"b1".to_vec(), revision: r1 }));

        // Puts and deletes together, each on its own expectation.
        let changed = store
            .commit(vec![
                Op::put("batch/a", b"a2".to_vec(), Expect::Revision(r1)),
                Op::delete("batch/b", Expect::Revision(r1)),
                Op::put("batch/c", b"c1".to_vec(), Expect::Absent),
            ])
            .await
            .unwrap();
        let r2 = changed[0];
        assert!(r2 > r1, "{r2} after {r1}");
        assert_eq!(changed, [r2, r2, r2]);
        assert_eq!(store.get("batch/a").await.unwrap(), Some(Versioned { value: b"a2".to_vec(), revision: r2 }));
        assert_eq!(store.get("batch/b").await.unwrap(), None);
        assert_eq!(store.get("batch/c").await.unwrap().unwrap().revision, r2);
        // The revision put returns next is past the commit's, as for any write.
        let after = store.put("batch/c", b"c2".to_vec(), Expect::Revision(r2)).await.unwrap();
        assert!(after > r2, "{after} after {r2}");

        // One expectation that fails writes nothing, wherever it is, and names its op.
        let before = store.list("batch/").await.unwrap();
        let stale = store
            .commit(vec![
                Op::put("batch/d", b"d".to_vec(), Expect::Absent),
                Op::put("batch/a", b"a3".to_vec(), Expect::Revision(r1)),
                Op::delete("batch/c", Expect::Revision(after)),
            ])
            .await;
        assert_eq!(conflict_at(stale), (1, "batch/a".to_string(), Some(r2)));
        let exists = store
            .commit(vec![Op::delete("batch/a", Expect::Any), Op::put("batch/c", b"x".to_vec(), Expect::Absent)])
            .await;
        assert_eq!(conflict_at(exists), (1, "batch/c".to_string(), Some(after)));
        let gone = store.commit(vec![Op::delete("batch/b", Expect::Revision(r2))]).await;
        assert_eq!(conflict_at(gone), (0, "batch/b".to_string(), None));
        // Revision 0 never matches, as for put.
        let zero = store.commit(vec![Op::put("batch/z", b"z".to_vec(), Expect::Revision(0))]).await;
        assert_eq!(conflict_at(zero), (0, "batch/z".to_string(), None));
        // A key named twice is refused, and nothing is written.
        let twice = store
            .commit(vec![
                Op::put("batch/e", b"1".to_vec(), Expect::Any),
                Op::put("batch/e", b"2".to_vec(), Expect::Any),
            ])
            .await;
        assert!(matches!(&twice, Err(CommitError::Store(e)) if e.to_string().contains("batch/e")), "{twice:?}");
        assert_eq!(store.list("batch/").await.unwrap(), before);

        // As many ops as the store takes at once, in one commit.
        let most = store.commit_limits().ops.min(300);
        let ops = (0..most).map(|i| Op::put(format!("many/{i:03}"), vec![1; 200], Expect::Absent)).collect();
        let revisions = store.commit(ops).await.unwrap();
        assert_eq!(revisions.len(), most);
        assert!(revisions.iter().all(|r| *r == revisions[0]), "{revisions:?}");
        assert_eq!(store.list("many/").await.unwrap().len(), most);
    }

    pub async fn watch(store: &dyn Store) {
        let mut events = store.watch("watched/", 0).await.unwrap();

        // A put after watch() arrives, with the revision the put returned.
        let r1 = store.put("watched/a", b"1".to_vec(), Expect::Absent).await.unwrap();
        assert_eq!(
            next_event(&mut events).await,
            WatchEvent::Put { key: "watched/a".into(), value: b"1".to_vec(), revision: r1 }
        );

        // Keys outside the prefix are not seen; order is revision order.
        store.put("unwatched/x", b"x".to_vec(), Expect::Any).await.unwrap();
        let r2 = store.put("watched/b", b"2".to_vec(), Expect::Any).await.unwrap();
        let r3 = store.put("watched/a", b"3".to_vec(), Expect::Revision(r1)).await.unwrap();
        assert_eq!(
            next_event(&mut events).await,
            WatchEvent::Put { key: "watched/b".into(), value: b"2".to_vec(), revision: r2 }
        );
        assert_eq!(
            next_event(&mut events).await,
            WatchEvent::Put { key: "watched/a".into(), value: b"3".to_vec(), revision: r3 }
        );

        // A refused write is not an event; a delete is.
        assert!(store.put("watched/a", b"no".to_vec(), Expect::Absent).await.is_err());
        store.delete("watched/b", Expect::Revision(r2)).await.unwrap();
        match next_event(&mut events).await {
            WatchEvent::Delete { key, revision } => {
                assert_eq!(key, "watched/b");
                assert!(revision > r3, "delete at {revision}, after {r3}");
            }
            other => panic!("expected the delete of watched/b, got {other:?}"),
        }

        // A commit's changes arrive in its ops' order, at its one revision.
        let committed = store
            .commit(vec![
                Op::put("watched/d", b"5".to_vec(), Expect::Absent),
                Op::delete("watched/a", Expect::Revision(r3)),
            ])
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut events).await,
            WatchEvent::Put { key: "watched/d".into(), value: b"5".to_vec(), revision: committed[0] }
        );
        assert_eq!(
            next_event(&mut events).await,
            WatchEvent::Delete { key: "watched/a".into(), revision: committed[1] }
        );

        // From an older revision: replayed, or a Resync where history is not kept.
        let mut replay = store.watch("watched/", r1).await.unwrap();
        match next_event(&mut replay).await {
            WatchEvent::Resync => {}
            WatchEvent::Put { key, revision, .. } => assert_eq!((key.as_str(), revision), ("watched/a", r1)),
            other => panic!("expected the put at {r1} or Resync, got {other:?}"),
        }

        // Two watchers see the same change.
        let r4 = store.put("watched/c", b"4".to_vec(), Expect::Any).await.unwrap();
        let expected = WatchEvent::Put { key: "watched/c".into(), value: b"4".to_vec(), revision: r4 };
        assert_eq!(next_event(&mut events).await, expected);
        loop {
            match next_event(&mut replay).await {
                event if event == expected => break,
                WatchEvent::Resync | WatchEvent::Put { .. } | WatchEvent::Delete { .. } => {}
            }
        }
    }
}
