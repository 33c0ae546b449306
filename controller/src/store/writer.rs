//! The controller's one store writer: state changes enqueue their records
//! here while the state is held (so the queue's order is the order of the
//! changes) and the state is released before anything waits on the store.
//! The writer task takes whatever is queued, keeps only the newest value of
//! each key, writes the batch in order with compare-and-set on the revision
//! it last wrote, and answers each write's [`Durable`] once it is stored.
//! A heartbeat enqueues (at most) and never waits; a handler whose answer
//! promises durability (submit, cancel) awaits its `Durable` after releasing
//! the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use super::{Expect, Store, StoreError};

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
        let (queue, rx) = mpsc::unbounded_channel();
        let known = Arc::new(Mutex::new(Known { revisions, in_flight: HashMap::new() }));
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(store, rx, known.clone(), closed.clone()));
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

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    known: Arc<Mutex<Known>>,
    closed: Arc<AtomicBool>,
) {
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
        for pending in coalesce(taken) {
            let count = counts.remove(&pending.key).unwrap_or(1);
            let is_delete = pending.value.is_none();
            let result = if closed.load(Ordering::SeqCst) {
                Err(stopped())
            } else {
                let expect = lock(&known).revisions.get(&pending.key).map_or(Expect::Absent, |r| Expect::Revision(*r));
                match pending.value {
                    Some(value) => store.put(&pending.key, value, expect).await,
                    None => store.delete(&pending.key, expect).await.map(|()| 0),
                }
            };
            match &result {
                Ok(revision) => settle(&known, &pending.key, count, Some(*revision)),
                Err(e) => {
                    tracing::error!(key = %pending.key, error = %e, "could not store a state change");
                    settle(&known, &pending.key, count, None);
                }
            }
            if is_delete && result.is_ok() {
                lock(&known).revisions.remove(&pending.key);
            }
            for waiting in pending.waiting {
                let _ = waiting.send(match &result {
                    Ok(revision) => Ok(*revision),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}
