//! The embedded store: one redb database file in the controller's data dir.
//! Durable (every write is a committed transaction) and single-process.
//! Watches are fed from the writes themselves; no history is kept.
//!
//! redb refuses every call after one I/O error (a full disk) until the
//! database is reopened: the store then reports itself failing and reopens
//! the file in the background, with backoff, until a write commits again.
//! A file redb cannot open or verify stops the controller with a message
//! naming the file; redb's own panics on a corrupted file are caught, at
//! start and on every call after it: a page found damaged while serving makes
//! the store failing (`/healthz` names the file and the fix) and reopens it,
//! which repairs what redb can.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{
    CommitError, Expect, Op, Store, StoreError, StoreHealth, Versioned, WatchEvent, WatchStream, check_distinct_keys,
};

/// key -> (revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" -> the last revision handed out
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// What a reopen writes, then removes, to know the disk takes writes again.
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
/// As big as a large job record: a write that fits in pages the file already
/// holds would pass on a disk that is still full.
const PROBE_BYTES: usize = 256 * 1024;

/// Changes a slow watcher may fall behind by before it gets a `Resync`.
const WATCH_BUFFER: usize = 1024;

/// The database file in the data dir.
pub const FILE_NAME: &str = "state.redb";

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    path: PathBuf,
    /// None while a reopen has let go of the file.
    db: RwLock<Option<Arc<Database>>>,
    /// Held across commit and publish, so watchers see changes in revision
    /// order; and by a reopen, so no write runs while the file changes hands.
    publish: Mutex<()>,
    changes: broadcast::Sender<WatchEvent>,
    /// Why the store fails, while it does.
    failing: Mutex<Option<Failing>>,
    /// A reopen task runs.
    reopening: AtomicBool,
    /// redb's page cache, for every open of the file.
    cache_bytes: usize,
}

/// redb's default page cache.
const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// Why the store fails now.
#[derive(Debug, Clone)]
enum Failing {
    /// The disk: full, read-only, failing (redb refuses every call after one I/O error).
    Io(String),
    /// The file holds what redb cannot read (a damaged page, a panic on it).
    Damaged(String),
}

/// Why the file could not be opened.
#[derive(Debug)]
enum OpenError {
    /// The disk: full, read-only, failing. Worth retrying.
    Io(String),
    /// Another process holds the file.
    InUse,
    /// redb found the file corrupted and could not repair it (or panicked on it).
    Corrupted(String),
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/state.redb`, repairing and verifying it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`EmbeddedStore::open`] with redb's page cache of `cache_bytes` (0: every
    /// read goes to the file, as a file bigger than the cache does).
    fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = open_verified(&path, cache_bytes).map_err(|e| {
            StoreError::Backend(match e {
                OpenError::InUse => format!(
                    "opening {}: the file is in use (is another cohort-controller using this --data-dir?)",
                    path.display()
                ),
                OpenError::Io(e) => {
                    format!(
                        "opening {}: {e}; free space on {} or fix the disk, then start again",
                        path.display(),
                        dir.display()
                    )
                }
                OpenError::Corrupted(e) => format!(
                    "the state file {path} is corrupted and redb could not repair it ({e}); \
                     restore {path} from a backup, or move it aside \
                     (mv {path} {path}.corrupt) and start again with no jobs and no nodes",
                    path = path.display()
                ),
            })
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                path,
                db: RwLock::new(Some(Arc::new(db))),
                publish: Mutex::new(()),
                changes: broadcast::channel(WATCH_BUFFER).0,
                failing: Mutex::new(None),
                reopening: AtomicBool::new(false),
                cache_bytes,
            }),
        })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let db = self.inner.db.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        db.ok_or_else(|| {
            let failing = lock(&self.inner.failing)
                .clone()
                .unwrap_or_else(|| Failing::Io("the database is being reopened".into()));
            self.inner.error(failing)
        })
    }

    /// Maps a redb error; an I/O error or a damaged page marks the store
    /// failing and starts a reopen.
    fn fail(&self, e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        let damage = match &e {
            // A length or offset read from a damaged page that points past the file's end.
            redb::Error::Io(io) => {
                matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData)
            }
            // Our tables are made at open with fixed types: finding them otherwise is a damaged page.
            redb::Error::Corrupted(_)
            | redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TableIsNotMultimap(_)
            | redb::Error::TableDoesNotExist(_)
            | redb::Error::UpgradeRequired(_) => true,
            _ => false,
        };
        // What a commit that failed on a full disk leaves is the disk's doing, not the file's.
        let disk_failing = matches!(*lock(&self.inner.failing), Some(Failing::Io(_)));
        match e {
            _ if damage && !disk_failing => self.failing(Failing::Damaged(e.to_string())),
            _ if damage => self.failing(Failing::Io(e.to_string())),
            redb::Error::Io(_) | redb::Error::PreviousIo => self.failing(Failing::Io(e.to_string())),
            other => StoreError::Backend(other.to_string()),
        }
    }

    fn failing(&self, failing: Failing) -> StoreError {
        self.inner.set_failing(&failing);
        self.start_reopening();
        self.inner.error(failing)
    }

    /// Runs a call into redb, which panics on some impossible values read
    /// from a damaged page: such a panic fails this call and the store (like
    /// a damaged page redb reports), never the task that made the call.
    fn guarded<T, E: From<StoreError>>(&self, call: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        quietly(call).unwrap_or_else(|panic| {
            let failing = Failing::Damaged(format!("redb stopped on an impossible value read from it: {panic}"));
            Err(self.failing(failing).into())
        })
    }

    fn start_reopening(&self) {
        if self.inner.reopening.swap(true, Ordering::SeqCst) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(reopen_until_writable(self.inner.clone()));
            }
            // Outside a runtime nothing can wait: the next failing call tries again.
            Err(_) => self.inner.reopening.store(false, Ordering::SeqCst),
        }
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        self.guarded(|| {
            let txn = db.begin_read().map_err(|e| self.fail(e))?;
            let meta = txn.open_table(META).map_err(|e| self.fail(e))?;
            Ok(meta.get("revision").map_err(|e| self.fail(e))?.map(|v| v.value()).unwrap_or(0))
        })
    }

    fn write(&self, key: &str, value: Option<Vec<u8>>, expect: Expect) -> Result<u64, StoreError> {
        match self.apply(vec![Op { key: key.to_string(), value, expect }]) {
            Ok(revision) => Ok(revision),
            Err(CommitError::Conflict { error, .. } | CommitError::Store(error)) => Err(error),
        }
    }

    /// Commits `ops` as one write transaction and publishes their changes in
    /// order; returns the transaction's revision.
    fn apply(&self, ops: Vec<Op>) -> Result<u64, CommitError> {
        let _publishing = lock(&self.inner.publish);
        let db = self.db()?;
        let revision = self.guarded(|| self.transact(&db, &ops))?;
        for op in ops {
            let key = op.key;
            let event = match op.value {
                Some(value) => WatchEvent::Put { key, value, revision },
                None => WatchEvent::Delete { key, revision },
            };
            // No receiver is fine: nobody watches.
            let _ = self.inner.changes.send(event);
        }
        Ok(revision)
    }

    /// One write transaction: every op if every expectation holds, at one new revision.
    fn transact(&self, db: &Database, ops: &[Op]) -> Result<u64, CommitError> {
        let txn = db.begin_write().map_err(|e| self.fail(e))?;
        let revision = {
            let mut kv = txn.open_table(KV).map_err(|e| self.fail(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.fail(e))?;
            for (index, op) in ops.iter().enumerate() {
                let found = kv.get(op.key.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().0);
                if !op.expect.holds(found) {
                    let error = StoreError::Conflict { key: op.key.clone(), expected: op.expect, found };
                    return Err(CommitError::Conflict { index, error });
                }
            }
            let revision = meta.get("revision").map_err(|e| self.fail(e))?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("revision", revision).map_err(|e| self.fail(e))?;
            for op in ops {
                match &op.value {
                    Some(value) => {
                        kv.insert(op.key.as_str(), (revision, value.as_slice())).map_err(|e| self.fail(e))?;
                    }
                    None => {
                        kv.remove(op.key.as_str()).map_err(|e| self.fail(e))?;
                    }
                }
            }
            revision
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(revision)
    }
}

impl Inner {
    fn error(&self, failing: Failing) -> StoreError {
        match failing {
            Failing::Io(error) => StoreError::Unwritable { error, dir: self.dir.display().to_string() },
            Failing::Damaged(error) => StoreError::Damaged { error, file: self.path.display().to_string() },
        }
    }

    fn set_failing(&self, new: &Failing) {
        let mut failing = lock(&self.failing);
        let file = self.path.display();
        match (&*failing, new) {
            (None | Some(Failing::Damaged(_)), Failing::Io(error)) => {
                tracing::error!(file = %file, %error, "the store cannot write; reopening it until it can");
            }
            (None | Some(Failing::Io(_)), Failing::Damaged(error)) => {
                tracing::error!(file = %file, %error, "the state file is damaged; reopening it (redb repairs what it can)");
            }
            _ => {}
        }
        *failing = Some(new.clone());
    }

    /// Lets go of the file, opens it again (redb repairs what a failed commit
    /// left) and commits a probe write of [`PROBE_BYTES`]: the store is
    /// writable once that commits.
    fn reopen(&self) -> Result<(), Failing> {
        let _publishing = lock(&self.publish);
        // A reader still holding the old handle keeps the file locked: the next attempt gets it.
        drop(self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
        let db = open_verified(&self.path, self.cache_bytes).map_err(|e| match e {
            OpenError::Io(e) => Failing::Io(e),
            OpenError::Corrupted(e) => Failing::Damaged(e),
            OpenError::InUse => Failing::Io("the old handle is still in use".into()),
        })?;
        let probe = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(PROBE)?.insert("probe", vec![0u8; PROBE_BYTES].as_slice())?;
            txn.commit()?;
            let txn = db.begin_write()?;
            txn.open_table(PROBE)?.remove("probe")?;
            txn.commit()?;
            Ok(())
        };
        match quietly(probe) {
            Ok(Ok(())) => {}
            Ok(Err(e @ redb::Error::Corrupted(_))) => return Err(Failing::Damaged(e.to_string())),
            Ok(Err(e)) => return Err(Failing::Io(e.to_string())),
            Err(panic) => {
                return Err(Failing::Damaged(format!("redb stopped on an impossible value read from it: {panic}")));
            }
        }
        *self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(db));
        *lock(&self.failing) = None;
        Ok(())
    }
}

/// Reopens the store, with backoff, until a write commits.
async fn reopen_until_writable(inner: Arc<Inner>) {
    let since = tokio::time::Instant::now();
    loop {
        let mut delays = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
            let attempt = inner.clone();
            match tokio::task::spawn_blocking(move || attempt.reopen()).await {
                Ok(Ok(())) => break,
                Ok(Err(failing)) => {
                    tracing::debug!(file = %inner.path.display(), ?failing, "the store still cannot write");
                    inner.set_failing(&failing);
                }
                Err(e) => inner.set_failing(&Failing::Io(format!("reopening the database: {e}"))),
            }
        }
        tracing::info!(file = %inner.path.display(), after = ?since.elapsed(), "the store can write again");
        inner.reopening.store(false, Ordering::SeqCst);
        // A write that failed between the probe and here found the flag still set.
        if lock(&inner.failing).is_none() || inner.reopening.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// Opens `path` (redb repairs a file that was not closed cleanly), checks
/// every page's checksum and reads every record, so a corrupted file fails
/// here rather than in the middle of serving.
fn open_verified(path: &Path, cache_bytes: usize) -> Result<Database, OpenError> {
    let opened = quietly(|| -> Result<Database, redb::Error> {
        let mut db = Database::builder().set_cache_size(cache_bytes).create(path)?;
        if !db.check_integrity()? {
            tracing::warn!(file = %path.display(), "the store file was damaged; redb repaired it");
        }
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.open_table(META)?;
        txn.commit()?;
        let txn = db.begin_read()?;
        for entry in txn.open_table(KV)?.iter()? {
            let (key, value) = entry?;
            let _ = (key.value(), value.value());
        }
        for entry in txn.open_table(META)?.iter()? {
            entry?;
        }
        drop(txn);
        Ok(db)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::Error::DatabaseAlreadyOpen)) => Err(OpenError::InUse),
        Ok(Err(redb::Error::Io(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(OpenError::Corrupted(e.to_string()))
        }
        Ok(Err(e @ (redb::Error::Io(_) | redb::Error::PreviousIo))) => Err(OpenError::Io(e.to_string())),
        Ok(Err(e)) => Err(OpenError::Corrupted(e.to_string())),
        Err(panic) => Err(OpenError::Corrupted(format!("redb stopped on an impossible value in it: {panic}"))),
    }
}

thread_local! {
    /// Set while [`quietly`] runs on this thread: the panic's message goes here, not to stderr.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic into an error with its message. redb asserts
/// on impossible values read from a damaged file (in debug builds): that is
/// a corrupted file to report, not a crash with a backtrace.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let others = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let caught = CAUGHT.with(|caught| {
                let mut caught = caught.borrow_mut();
                match caught.as_mut() {
                    Some(slot) => {
                        *slot = Some(panic_message(info.payload()));
                        true
                    }
                    None => false,
                }
            });
            if !caught {
                others(info);
            }
        }));
    });
    CAUGHT.with(|caught| *caught.borrow_mut() = Some(None));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    let message = CAUGHT.with(|caught| caught.borrow_mut().take()).flatten();
    result.map_err(|payload| message.unwrap_or_else(|| panic_message(&*payload)))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic".into(),
    }
}

/// A poisoned lock only means another thread panicked; what it guards is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// redb calls are short and synchronous (one small transaction); they run
// inline rather than on the blocking pool.
#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let db = self.db()?;
        self.guarded(|| {
            let txn = db.begin_read().map_err(|e| self.fail(e))?;
            let kv = txn.open_table(KV).map_err(|e| self.fail(e))?;
            Ok(kv.get(key).map_err(|e| self.fail(e))?.map(|v| {
                let (revision, value) = v.value();
                Versioned { value: value.to_vec(), revision }
            }))
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let db = self.db()?;
        self.guarded(|| {
            let txn = db.begin_read().map_err(|e| self.fail(e))?;
            let kv = txn.open_table(KV).map_err(|e| self.fail(e))?;
            let mut out = Vec::new();
            for entry in kv.range(prefix..).map_err(|e| self.fail(e))? {
                let (k, v) = entry.map_err(|e| self.fail(e))?;
                let key = k.value();
                if !key.starts_with(prefix) {
                    break;
                }
                let (revision, value) = v.value();
                out.push((key.to_string(), Versioned { value: value.to_vec(), revision }));
            }
            Ok(out)
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
        self.write(key, Some(value), expect)
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        self.write(key, None, expect).map(|_| ())
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<u64>, CommitError> {
        check_distinct_keys(&ops)?;
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let count = ops.len();
        let revision = self.apply(ops)?;
        Ok(vec![revision; count])
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        let changes = self.inner.changes.subscribe();
        // History is not kept: asking for the past means re-listing.
        let missed_history = from_revision != 0 && from_revision <= self.current_revision()?;
        let prefix = prefix.to_string();
        let live = BroadcastStream::new(changes).filter_map(move |change| {
            let event = match change {
                Ok(event) => match &event {
                    WatchEvent::Put { key, revision, .. } | WatchEvent::Delete { key, revision }
                        if key.starts_with(&prefix) && *revision >= from_revision =>
                    {
                        Some(event)
                    }
                    _ => None,
                },
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "store watcher fell behind; it must re-list");
                    Some(WatchEvent::Resync)
                }
            };
            std::future::ready(event)
        });
        let first = missed_history.then_some(WatchEvent::Resync);
        Ok(Box::pin(futures::stream::iter(first).chain(live)))
    }

    fn health(&self) -> StoreHealth {
        match lock(&self.inner.failing).clone() {
            None => StoreHealth::Ok,
            Some(failing) => StoreHealth::Failing(self.inner.error(failing).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn slow_watcher_gets_resync() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut events = store.watch("jobs/", 0).await.unwrap();
        for i in 0..WATCH_BUFFER + 10 {
            store.put(&format!("jobs/{i}"), vec![], Expect::Any).await.unwrap();
        }
        assert_eq!(events.next().await, Some(WatchEvent::Resync));
        let last = store.put("jobs/last", vec![], Expect::Any).await.unwrap();
        let mut seen = None;
        while let Some(event) = events.next().await {
            if let WatchEvent::Put { key, revision, .. } = event
                && key == "jobs/last"
            {
                seen = Some(revision);
                break;
            }
        }
        assert_eq!(seen, Some(last));
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rev = {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.put("jobs/x", b"kept".to_vec(), Expect::Absent).await.unwrap()
        };
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let got = store.get("jobs/x").await.unwrap().unwrap();
        assert_eq!(got, Versioned { value: b"kept".to_vec(), revision: rev });
        // Revisions keep increasing across restarts.
        assert!(store.put("jobs/y", vec![], Expect::Any).await.unwrap() > rev);
    }

    /// The bytes of a store file holding 40 job records of 300 bytes.
    async fn store_file_of_40_records() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for i in 0..40 {
            store.put(&format!("jobs/j{i}"), vec![i as u8; 300], Expect::Any).await.unwrap();
        }
        drop(store);
        std::fs::read(dir.path().join(FILE_NAME)).unwrap()
    }

    /// A page damaged under a running store (read from the file, as in a
    /// file bigger than redb's cache): every call answers, Ok or an error
    /// naming the file; a failure makes the store unhealthy with the file
    /// and the fix; redb's panics on the page never reach the caller.
    #[tokio::test]
    async fn a_page_damaged_while_serving_is_an_unhealthy_store_never_a_panic() {
        use std::os::unix::fs::FileExt;
        let pristine = store_file_of_40_records().await;
        let (mut fine, mut damaged, mut panics) = (0, 0, 0);
        for offset in (4096..pristine.len()).step_by(211) {
            let case = tempfile::tempdir().unwrap();
            let file = case.path().join(FILE_NAME);
            std::fs::write(&file, &pristine).unwrap();
            let store = EmbeddedStore::open_with_cache(case.path(), 0).unwrap();
            let byte = pristine[offset] ^ 0xff;
            std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(&[byte], offset as u64).unwrap();
            let results = [
                store.list("jobs/").await.map(|_| ()),
                store.get("jobs/j7").await.map(|_| ()),
                store.put("jobs/new", vec![1; 300], Expect::Any).await.map(|_| ()),
            ];
            let errors: Vec<String> = results.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
            if errors.is_empty() {
                fine += 1;
                continue;
            }
            // The file (damage) or its directory (I/O).
            for error in &errors {
                assert!(error.contains(&case.path().display().to_string()), "offset {offset}: {error}");
            }
            match store.health() {
                StoreHealth::Failing(why) => {
                    assert!(why.contains(&case.path().display().to_string()), "offset {offset}: {why}");
                    assert!(why.contains("mv ") || why.contains("free space"), "offset {offset}: {why}");
                }
                StoreHealth::Ok => panic!("offset {offset}: calls failed ({errors:?}) and the store says Ok"),
            }
            damaged += 1;
            panics += usize::from(errors.iter().any(|e| e.contains("impossible value")));
        }
        eprintln!(
            "a flipped byte under a running store: {fine} unnoticed, {damaged} failing ({panics} redb panics caught)"
        );
        assert!(damaged > 0, "no damaged page was noticed: the test does not reach the failing path");
    }

    /// One flipped byte anywhere in the file: redb repairs it (every record
    /// still reads, or the open names the file and what to do); never a panic.
    #[tokio::test]
    async fn a_flipped_byte_is_repaired_or_named_never_a_panic() {
        let pristine = store_file_of_40_records().await;
        let header = (0..640).step_by(7);
        let body = (640..pristine.len()).step_by(pristine.len() / 150);
        let (mut opened, mut refused) = (0, 0);
        for offset in header.chain(body) {
            let case = tempfile::tempdir().unwrap();
            let mut bytes = pristine.clone();
            bytes[offset] ^= 0xff;
            std::fs::write(case.path().join(FILE_NAME), &bytes).unwrap();
            match EmbeddedStore::open(case.path()) {
                Ok(store) => {
                    store.list("jobs/").await.unwrap_or_else(|e| panic!("offset {offset}: opened, then {e}"));
                    opened += 1;
                }
                Err(e) => {
                    let message = e.to_string();
                    assert!(message.contains(&case.path().join(FILE_NAME).display().to_string()), "{message}");
                    assert!(message.contains("mv ") || message.contains("free space"), "offset {offset}: {message}");
                    refused += 1;
                }
            }
        }
        eprintln!("one flipped byte: {opened} opened (repaired or untouched), {refused} refused with a message");
    }
}
