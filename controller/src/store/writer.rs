//! The controller's one store writer: state changes enqueue their records
//! here while the state is held (so the queue's order is the order of the
//! changes) and the state is released before anything waits on the store.
//! The writer task takes whatever is queued, keeps only the newest value of
//! each key, writes the batch as one [`Store::commit`] (chunks within the
//! store's limits, in order) with compare-and-set on the revision it last wrote, and
//! answers each write's [`Durable`] once it is stored.
//! A heartbeat enqueues (at most) and never waits; a handler whose answer
//! promises durability (submit, cancel) awaits its `Durable` after releasing
//! the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use super::{CommitError, Expect, Op, Store, StoreError};

/// What the writer is asked: a write, or to answer once every write
/// queued before is over.
enum Queued {
    Write(Write),
    Flush(oneshot::Sender<()>),
}

/// One record to store: a value, or `None` to delete the key.
struct Write {
    key: String,
    value: Option<Vec<u8>>,
    done: Option<oneshot::Sender<Result<u64, StoreError>>>,
}

/// What the writer knows of each key, shared with the controller: the
/// revision it last wrote or was told of, and the keys being written now.
#[derive(Default)]
struct Known {
    revisions: HashMap<String, u64>,
    in_flight: HashMap<String, usize>,
}

/// How the writer stores a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// One [`Store::commit`] per batch, in chunks within [`Store::commit_limits`].
    Commits,
    /// One put or delete per key, one after another: how batches were
    /// written before commits, kept to measure against.
    PerKey,
}

pub struct StoreWriter {
    queue: mpsc::UnboundedSender<Queued>,
    known: Arc<Mutex<Known>>,
    closed: Arc<AtomicBool>,
}

/// The answer to one write: its revision once stored, or why it was not.
pub struct Durable(Answer);

enum Answer {
    Queued(oneshot::Receiver<Result<u64, StoreError>>),
    /// Nothing was written (nothing to write, or the writer has stopped).
    Ready(Result<u64, StoreError>),
}

impl Durable {
    /// Nothing to write: answered at once.
    pub fn nothing() -> Durable {
        Durable(Answer::Ready(Ok(0)))
    }

    pub async fn wait(self) -> Result<u64, StoreError> {
        match self.0 {
            Answer::Queued(done) => done.await.unwrap_or_else(|_| Err(stopped())),
            Answer::Ready(result) => result,
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Backend("the store writer stopped (this controller no longer leads); the write was not made".into())
}

impl StoreWriter {
    /// Starts the writer task; `revisions` are the keys' revisions as loaded.
    pub fn start(store: Arc<dyn Store>, revisions: HashMap<String, u64>) -> StoreWriter {
        Self::start_with(store, revisions, Batching::Commits)
    }

    /// [`StoreWriter::start`], storing batches as `batching` says.
    pub fn start_with(store: Arc<dyn Store>, revisions: HashMap<String, u64>, batching: Batching) -> StoreWriter {
        let (queue, rx) = mpsc::unbounded_channel();
        let known = Arc::new(Mutex::new(Known { revisions, in_flight: HashMap::new() }));
        let closed = Arc::new(AtomicBool::new(false));
        let task = Task { store, known: known.clone(), closed: closed.clone() };
        tokio::spawn(task.run(rx, batching));
        StoreWriter { queue, known, closed }
    }

    /// Queues `value` for `key` (`None`: delete it), after every write queued before.
    pub fn write(&self, key: String, value: Option<Vec<u8>>) -> Durable {
        let (done, answer) = oneshot::channel();
        lock(&self.known).in_flight.entry(key.clone()).and_modify(|n| *n += 1).or_insert(1);
        match self.queue.send(Queued::Write(Write { key: key.clone(), value, done: Some(done) })) {
            Ok(()) => Durable(Answer::Queued(answer)),
            Err(_) => {
                settle(&self.known, &key, 1, None);
                Durable(Answer::Ready(Err(stopped())))
            }
        }
    }

    /// Returns once every write queued before this call is over.
    pub async fn flush(&self) {
        let (done, over) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = over.await;
        }
    }

    /// Whether `revision` of `key` is this controller's own write (made or on
    /// its way) or older than one it knows: a store watcher then ignores it.
    pub fn is_known(&self, key: &str, revision: u64) -> bool {
        let known = lock(&self.known);
        known.in_flight.contains_key(key) || known.revisions.get(key).is_some_and(|r| *r >= revision)
    }

    /// A revision written by someone else and taken into the state: the
    /// next write of `key` expects it.
    pub fn adopt(&self, key: &str, revision: u64) {
        lock(&self.known).revisions.insert(key.to_string(), revision);
    }

    /// No write is made after this (leadership lost): queued ones fail.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock(known: &Mutex<Known>) -> MutexGuard<'_, Known> {
    known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `count` writes of `key` are over; `revision` is what the store holds now.
fn settle(known: &Mutex<Known>, key: &str, count: usize, revision: Option<u64>) {
    let mut known = lock(known);
    if let Some(revision) = revision {
        known.revisions.insert(key.to_string(), revision);
    }
    if let Some(n) = known.in_flight.get_mut(key) {
        *n = n.saturating_sub(count);
        if *n == 0 {
            known.in_flight.remove(key);
        }
    }
}

/// A key's newest value in a batch and everyone waiting on it.
struct Pending {
    key: String,
    value: Option<Vec<u8>>,
    waiting: Vec<oneshot::Sender<Result<u64, StoreError>>>,
}

impl Pending {
    /// As [`Op::size`] counts it.
    fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Coalesces a batch: one write per key, placed where its newest value was
/// queued, so that every key's writes keep their order and no key is written
/// before a change that was queued ahead of its newest value.
fn coalesce(batch: Vec<Write>) -> Vec<Pending> {
    let mut newest: HashMap<&str, usize> = HashMap::new();
    for (i, w) in batch.iter().enumerate() {
        newest.insert(w.key.as_str(), i);
    }
    let last: Vec<bool> = batch.iter().enumerate().map(|(i, w)| newest.get(w.key.as_str()) == Some(&i)).collect();
    let mut waiting: HashMap<String, Vec<oneshot::Sender<Result<u64, StoreError>>>> = HashMap::new();
    let mut out = Vec::new();
    for (w, is_last) in batch.into_iter().zip(last) {
        let senders = waiting.entry(w.key.clone()).or_default();
        senders.extend(w.done);
        if is_last {
            let waiting = waiting.remove(&w.key).unwrap_or_default();
            out.push(Pending { key: w.key, value: w.value, waiting });
        }
    }
    out
}

/// Most writes taken from the queue at once.
const BATCH: usize = 4096;

/// The writer task's side of a [`StoreWriter`].
struct Task {
    store: Arc<dyn Store>,
    known: Arc<Mutex<Known>>,
    closed: Arc<AtomicBool>,
}

impl Task {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Queued>, batching: Batching) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let mut taken = Vec::new();
            let mut flushes = Vec::new();
            for queued in batch.drain(..) {
                match queued {
                    Queued::Write(write) => taken.push(write),
                    Queued::Flush(done) => flushes.push(done),
                }
            }
            let mut counts: HashMap<String, usize> = HashMap::new();
            for w in &taken {
                *counts.entry(w.key.clone()).or_default() += 1;
            }
            let pending = coalesce(taken);
            match batching {
                Batching::Commits => self.commit_batch(pending, &mut counts).await,
                Batching::PerKey => {
                    for pending in pending {
                        let result = self.write_one(&pending).await;
                        self.finish(pending, &mut counts, result);
                    }
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// The batch in commits within the store's limits, in order. A key whose
    /// expectation fails (someone else wrote it) fails alone: the commit is
    /// made again without it. A store error fails the rest of the batch.
    async fn commit_batch(&self, pending: Vec<Pending>, counts: &mut HashMap<String, usize>) {
        let limits = self.store.commit_limits();
        let mut rest = pending.into_iter().peekable();
        loop {
            let mut chunk: Vec<Pending> = Vec::new();
            let mut bytes = 0;
            while let Some(next) = rest.peek() {
                let size = next.size();
                if !chunk.is_empty() && (chunk.len() >= limits.ops || bytes + size > limits.bytes) {
                    break;
                }
                bytes += size;
                chunk.extend(rest.next());
            }
            if chunk.is_empty() {
                return;
            }
            let failed = loop {
                if self.closed.load(Ordering::SeqCst) {
                    break Some(stopped());
                }
                let ops: Vec<Op> = {
                    let known = lock(&self.known);
                    chunk
                        .iter()
                        .map(|p| Op { key: p.key.clone(), value: p.value.clone(), expect: expectation(&known, &p.key) })
                        .collect()
                };
                match self.store.commit(ops).await {
                    Ok(revisions) => {
                        for (pending, revision) in chunk.drain(..).zip(revisions) {
                            self.finish(pending, counts, Ok(revision));
                        }
                        break None;
                    }
                    Err(CommitError::Conflict { index, error }) if index < chunk.len() => {
                        self.finish(chunk.remove(index), counts, Err(error));
                        if chunk.is_empty() {
                            break None;
                        }
                    }
                    Err(CommitError::Conflict { error, .. } | CommitError::Store(error)) => break Some(error),
                }
            };
            if let Some(error) = failed {
                for pending in chunk.into_iter().chain(rest) {
                    self.finish(pending, counts, Err(error.clone()));
                }
                return;
            }
        }
    }

    /// One key on its own (the [`Batching::PerKey`] way).
    async fn write_one(&self, pending: &Pending) -> Result<u64, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(stopped());
        }
        let expect = expectation(&lock(&self.known), &pending.key);
        match &pending.value {
            Some(value) => self.store.put(&pending.key, value.clone(), expect).await,
            None => self.store.delete(&pending.key, expect).await.map(|()| 0),
        }
    }

    /// `pending` is over: records what the store holds now and answers its waiters.
    fn finish(&self, pending: Pending, counts: &mut HashMap<String, usize>, result: Result<u64, StoreError>) {
        let count = counts.remove(&pending.key).unwrap_or(1);
        let is_delete = pending.value.is_none();
        // A delete answers 0: the key has no revision any more.
        let result = result.map(|revision| if is_delete { 0 } else { revision });
        match &result {
            Ok(revision) => settle(&self.known, &pending.key, count, Some(*revision)),
            Err(e) => {
                tracing::error!(key = %pending.key, error = %e, "could not store a state change");
                settle(&self.known, &pending.key, count, None);
            }
        }
        if is_delete && result.is_ok() {
            lock(&self.known).revisions.remove(&pending.key);
        }
        for waiting in pending.waiting {
            let _ = waiting.send(result.clone());
        }
    }
}

/// What the next write of `key` expects: the revision last written or adopted.
fn expectation(known: &Known, key: &str) -> Expect {
    known.revisions.get(key).map_or(Expect::Absent, |r| Expect::Revision(*r))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;

    use super::*;
    use crate::store::{CommitLimits, EmbeddedStore, Versioned, WatchStream};

    /// The embedded store, recording the keys of every commit and counting
    /// puts; commits take at most `limits`, and fail while `failing`.
    struct Recorded {
        inner: EmbeddedStore,
        limits: CommitLimits,
        commits: Mutex<Vec<Vec<String>>>,
        puts: AtomicUsize,
        failing: AtomicBool,
    }

    impl Recorded {
        fn open(dir: &std::path::Path, ops: usize) -> Arc<Recorded> {
            Self::limited(dir, CommitLimits { ops, bytes: usize::MAX })
        }

        fn limited(dir: &std::path::Path, limits: CommitLimits) -> Arc<Recorded> {
            Arc::new(Recorded {
                inner: EmbeddedStore::open(dir).unwrap(),
                limits,
                commits: Mutex::new(Vec::new()),
                puts: AtomicUsize::new(0),
                failing: AtomicBool::new(false),
            })
        }

        fn commits(&self) -> Vec<Vec<String>> {
            self.commits.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Store for Recorded {
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            self.inner.put(key, value, expect).await
        }
        async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            self.inner.delete(key, expect).await
        }
        async fn commit(&self, ops: Vec<Op>) -> Result<Vec<u64>, CommitError> {
            let bytes: usize = ops.iter().map(Op::size).sum();
            let fits = ops.len() <= self.limits.ops && (ops.len() == 1 || bytes <= self.limits.bytes);
            assert!(fits, "a commit of {} ops, {bytes} bytes, more than {:?}", ops.len(), self.limits);
            self.commits.lock().unwrap().push(ops.iter().map(|op| op.key.clone()).collect());
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Backend("etcd at 10.0.0.9:2379 is unreachable".into()).into());
            }
            self.inner.commit(ops).await
        }
        fn commit_limits(&self) -> CommitLimits {
            self.limits
        }
        async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix, from_revision).await
        }
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|k| k.to_string()).collect()
    }

    /// Writes queued together (the writer task has not run yet on this
    /// one-thread runtime) are one batch: one commit per 128 keys, in
    /// queue order, and no put.
    #[tokio::test]
    async fn a_batch_is_one_commit_per_chunk_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 128);
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        let names: Vec<String> = (0..300).map(|i| format!("nodes/n{i:03}")).collect();
        let durables: Vec<Durable> =
            names.iter().map(|k| writer.write(k.clone(), Some(k.as_bytes().to_vec()))).collect();
        let mut revisions = Vec::new();
        for durable in durables {
            revisions.push(durable.wait().await.unwrap());
        }

        let commits = store.commits();
        let sizes: Vec<usize> = commits.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44]);
        assert_eq!(commits.concat(), names);
        assert_eq!(store.puts.load(Ordering::SeqCst), 0);
        // Each answer is the revision the store holds, which the next write expects.
        for (key, revision) in names.iter().zip(&revisions) {
            assert_eq!(store.get(key).await.unwrap().unwrap().revision, *revision, "{key}");
            assert!(writer.is_known(key, *revision) && !writer.is_known(key, revision + 1));
        }
        assert!(revisions[0] < revisions[128] && revisions[128] < revisions[299], "chunks in order: {revisions:?}");
        writer.write(names[0].clone(), Some(b"again".to_vec())).wait().await.unwrap();
    }

    /// Commits stay within the store's bytes too; a record bigger than that
    /// goes alone (the store refuses it or not, as it would a put).
    #[tokio::test]
    async fn a_batch_is_split_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::limited(dir.path(), CommitLimits { ops: 128, bytes: 1000 });
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        let sizes = [400, 400, 400, 5000, 100, 100];
        let durables: Vec<Durable> =
            sizes.iter().enumerate().map(|(i, n)| writer.write(format!("jobs/j{i}"), Some(vec![7; *n]))).collect();
        for durable in durables {
            durable.wait().await.unwrap();
        }
        let commits = store.commits();
        assert_eq!(
            commits,
            [keys(&["jobs/j0", "jobs/j1"]), keys(&["jobs/j2"]), keys(&["jobs/j3"]), keys(&["jobs/j4", "jobs/j5"])]
        );
        assert_eq!(store.get("jobs/j3").await.unwrap().unwrap().value.len(), 5000);
    }

    /// A key someone else wrote fails alone, with the conflict, exactly once;
    /// the rest of its batch is stored.
    #[tokio::test]
    async fn a_foreign_write_fails_only_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 128);
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        for key in ["jobs/a", "jobs/b", "jobs/c"] {
            writer.write(key.into(), Some(b"1".to_vec()));
        }
        writer.flush().await;
        let foreign = store.inner.put("jobs/b", b"theirs".to_vec(), Expect::Any).await.unwrap();

        let a = writer.write("jobs/a".into(), Some(b"2".to_vec()));
        let b = writer.write("jobs/b".into(), Some(b"2".to_vec()));
        let c = writer.write("jobs/c".into(), None);
        assert!(a.wait().await.is_ok());
        match b.wait().await {
            Err(StoreError::Conflict { key, found, .. }) => {
                assert_eq!((key.as_str(), found), ("jobs/b", Some(foreign)))
            }
            other => panic!("expected the conflict on jobs/b, got {other:?}"),
        }
        assert_eq!(c.wait().await.unwrap(), 0, "a delete answers 0");

        assert_eq!(store.get("jobs/a").await.unwrap().unwrap().value, b"2");
        assert_eq!(store.get("jobs/b").await.unwrap().unwrap().value, b"theirs");
        assert_eq!(store.get("jobs/c").await.unwrap(), None);
        // The batch, then the batch again without the key that failed.
        assert_eq!(&store.commits()[1..], [keys(&["jobs/a", "jobs/b", "jobs/c"]), keys(&["jobs/a", "jobs/c"])]);
        // Once the foreign revision is adopted, the key can be written again.
        assert!(!writer.is_known("jobs/b", foreign));
        writer.adopt("jobs/b", foreign);
        let mine = writer.write("jobs/b".into(), Some(b"3".to_vec())).wait().await.unwrap();
        assert_eq!(store.get("jobs/b").await.unwrap().unwrap(), Versioned { value: b"3".to_vec(), revision: mine });
    }

    /// Batches are committed in queue order; within one, a key is written
    /// once with its newest value, placed where that value was queued.
    #[tokio::test]
    async fn batches_keep_queue_order_and_a_key_is_written_once_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 128);
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        let x1 = writer.write("jobs/x".into(), Some(b"x1".to_vec()));
        let y1 = writer.write("jobs/y".into(), Some(b"y1".to_vec()));
        let x2 = writer.write("jobs/x".into(), Some(b"x2".to_vec()));
        writer.flush().await;
        let z1 = writer.write("jobs/z".into(), Some(b"z1".to_vec()));
        let x3 = writer.write("jobs/x".into(), Some(b"x3".to_vec()));
        let y2 = writer.write("jobs/y".into(), None);

        let (x1, x2) = (x1.wait().await.unwrap(), x2.wait().await.unwrap());
        assert_eq!(x1, x2, "both waiters of one coalesced write get its revision");
        let y1 = y1.wait().await.unwrap();
        let (z1, x3) = (z1.wait().await.unwrap(), x3.wait().await.unwrap());
        assert_eq!(y2.wait().await.unwrap(), 0);
        assert!(x2 == y1 && z1 == x3 && x3 > x2, "one revision per commit, the second later: {x2} {y1} {z1} {x3}");

        assert_eq!(store.commits(), [keys(&["jobs/y", "jobs/x"]), keys(&["jobs/z", "jobs/x", "jobs/y"])]);
        assert_eq!(store.get("jobs/x").await.unwrap().unwrap(), Versioned { value: b"x3".to_vec(), revision: x3 });
        assert_eq!(store.get("jobs/y").await.unwrap(), None);
        assert!(!writer.is_known("jobs/y", 1), "a deleted key is forgotten");
    }

    /// A store error fails every write of its batch, in every chunk; the
    /// next batch is written again.
    #[tokio::test]
    async fn a_store_error_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 2);
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        store.failing.store(true, Ordering::SeqCst);
        let durables: Vec<Durable> = (0..5).map(|i| writer.write(format!("nodes/n{i}"), Some(vec![1]))).collect();
        for durable in durables {
            let err = durable.wait().await.unwrap_err();
            assert!(err.to_string().contains("10.0.0.9:2379"), "{err}");
        }
        assert_eq!(store.commits().len(), 1, "the chunks after a store error are not tried");
        assert!(!writer.is_known("nodes/n4", 1), "nothing is in flight after the failure");

        store.failing.store(false, Ordering::SeqCst);
        writer.write("nodes/n0".into(), Some(vec![2])).wait().await.unwrap();
        assert_eq!(store.get("nodes/n0").await.unwrap().unwrap().value, [2]);
    }

    /// After close, queued writes fail and nothing reaches the store.
    #[tokio::test]
    async fn a_closed_writer_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 128);
        let writer = StoreWriter::start(store.clone(), HashMap::new());
        let queued = writer.write("jobs/a".into(), Some(vec![1]));
        writer.close();
        let err = queued.wait().await.unwrap_err();
        assert!(err.to_string().contains("no longer leads"), "{err}");
        assert!(store.commits().is_empty());
        assert_eq!(store.get("jobs/a").await.unwrap(), None);
    }

    /// The per-key way: one put or delete per key, same answers.
    #[tokio::test]
    async fn per_key_batching_puts_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Recorded::open(dir.path(), 128);
        let writer = StoreWriter::start_with(store.clone(), HashMap::new(), Batching::PerKey);
        let a = writer.write("jobs/a".into(), Some(vec![1]));
        let b = writer.write("jobs/b".into(), Some(vec![2]));
        let (a, b) = (a.wait().await.unwrap(), b.wait().await.unwrap());
        assert!(b > a, "one revision per put: {a} {b}");
        assert_eq!(writer.write("jobs/a".into(), None).wait().await.unwrap(), 0);
        assert_eq!(store.puts.load(Ordering::SeqCst), 3);
        assert!(store.commits().is_empty());
        assert_eq!(store.list("jobs/").await.unwrap().len(), 1);
    }
}
