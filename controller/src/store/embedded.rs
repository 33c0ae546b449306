//! The embedded store: one redb database file in the controller's data dir.
//! Durable (every write is a committed transaction) and single-process.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Expect, Store, StoreError, Versioned};

/// key -> (revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" -> the last revision handed out
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
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
        Ok(Self { db: Arc::new(db) })
    }

    fn write(&self, key: &str, value: Option<Vec<u8>>, expect: Expect) -> Result<u64, StoreError> {
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
