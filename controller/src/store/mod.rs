//! The controller's durable state, behind one `Store` trait: an embedded,
//! persistent store for a single machine (the default) and, later, etcd.
//!
//! Keys are plain strings (`jobs/<id>`, `nodes/<name>`); values are encoded
//! protobuf records. Every key carries a revision so that writers can make
//! compare-and-set updates: two controllers can never both move a job.

mod embedded;

pub use embedded::EmbeddedStore;

use async_trait::async_trait;

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store conflict on {key}: expected {expected:?}, found revision {found:?}")]
    Conflict { key: String, expected: Expect, found: Option<u64> },
    #[error("store backend error: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Writes `value` if `expect` holds; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError>;
    async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError>;
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every `Store` must have; run against each backend.
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub async fn run_all(store: &dyn Store) {
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

        let wrong = store.delete("jobs/a", Expect::Revision(r1)).await;
        assert!(matches!(wrong, Err(StoreError::Conflict { .. })));
        store.delete("jobs/a", Expect::Revision(r2)).await.unwrap();
        assert_eq!(store.get("jobs/a").await.unwrap(), None);
        assert_eq!(store.list("jobs/").await.unwrap().len(), 1);
    }
}
