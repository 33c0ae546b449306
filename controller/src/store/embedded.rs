//! The embedded store: one redb database file in the controller's data dir.
//! Durable (every write is a committed transaction) and single-process.
//! Watches are fed from the writes themselves; no history is kept.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{Expect, Store, StoreError, Versioned, WatchEvent, WatchStream};

/// key -> (revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" -> the last revision handed out
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Changes a slow watcher may fall behind by before it gets a `Resync`.
const WATCH_BUFFER: usize = 1024;

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Held across commit and publish, so watchers see changes in revision order.
    publish: Arc<Mutex<()>>,
    changes: broadcast::Sender<WatchEvent>,
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/state.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| {
            StoreError::Backend(format!(
                "opening {}: {e} (is another cohort-controller using this --data-dir?)",
                path.display()
            ))
        })?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(KV).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db), publish: Arc::new(Mutex::new(())), changes: broadcast::channel(WATCH_BUFFER).0 })
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        Ok(meta.get("revision").map_err(backend)?.map(|v| v.value()).unwrap_or(0))
    }

    fn write(&self, key: &str, value: Option<Vec<u8>>, expect: Expect) -> Result<u64, StoreError> {
        // A poisoned lock only means another writer panicked; the database is still consistent.
        let _publishing = self.publish.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let txn = self.db.begin_write().map_err(backend)?;
        let revision = {
            let mut kv = txn.open_table(KV).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            let found = kv.get(key).map_err(backend)?.map(|v| v.value().0);
            let ok = match expect {
                Expect::Any => true,
                Expect::Absent => found.is_none(),
                Expect::Revision(r) => found == Some(r),
            };
            if !ok {
                return Err(StoreError::Conflict { key: key.to_string(), expected: expect, found });
            }
            let revision = meta.get("revision").map_err(backend)?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("revision", revision).map_err(backend)?;
            match &value {
                Some(value) => {
                    kv.insert(key, (revision, value.as_slice())).map_err(backend)?;
                }
                None => {
                    kv.remove(key).map_err(backend)?;
                }
            }
            revision
        };
        txn.commit().map_err(backend)?;
        let key = key.to_string();
        let event = match value {
            Some(value) => WatchEvent::Put { key, value, revision },
            None => WatchEvent::Delete { key, revision },
        };
        // No receiver is fine: nobody watches.
        let _ = self.changes.send(event);
        Ok(revision)
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

// redb calls are short and synchronous (one small transaction); they run
// inline rather than on the blocking pool.
#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let kv = txn.open_table(KV).map_err(backend)?;
        Ok(kv.get(key).map_err(backend)?.map(|v| {
            let (revision, value) = v.value();
            Versioned { value: value.to_vec(), revision }
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let kv = txn.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in kv.range(prefix..).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (revision, value) = v.value();
            out.push((key.to_string(), Versioned { value: value.to_vec(), revision }));
        }
        Ok(out)
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
        self.write(key, Some(value), expect)
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        self.write(key, None, expect).map(|_| ())
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        let changes = self.changes.subscribe();
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
}
