//! Metadata: small traits, one per concern, behind `Arc<dyn MetaStore>`, so a second backend
//! (PostgreSQL) is a second implementation and callers do not change.

mod sled_store;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::MetaBackend;

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Backend(String),
    #[error("metadata record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// What the repository knows of one stored image. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    pub content_type: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub created_at_ms: i64,
    /// Retention in seconds; `None` keeps the image forever.
    pub retention_secs: Option<u64>,
    pub expires_at_ms: Option<i64>,
    pub signature_key_id: String,
    /// Ed25519 signature over the 32-byte digest, base64.
    pub signature: String,
    /// Object-store key of the bytes.
    pub blob_key: String,
}

impl FirmwareRecord {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// Name → record, with create-once semantics.
#[async_trait]
pub trait FirmwareCatalog: Send + Sync {
    async fn get(&self, name: &str) -> Result<Option<FirmwareRecord>, MetaError>;
    /// Stores `record` unless its name is taken; returns the holder of the name otherwise.
    /// The record is durable when this returns `Ok(None)`.
    async fn insert_new(
        &self,
        record: &FirmwareRecord,
    ) -> Result<Option<FirmwareRecord>, MetaError>;
    /// Replaces the record with the same name and blob; `false` if there is none.
    async fn update(&self, record: &FirmwareRecord) -> Result<bool, MetaError>;
    /// Removes the record of `name` if it still points at `blob_key`.
    async fn remove(&self, name: &str, blob_key: &str) -> Result<bool, MetaError>;
    /// Records whose names start with `prefix`, in name order, after `after`.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError>;
    /// Number of records and sum of their sizes.
    async fn totals(&self) -> Result<(u64, u64), MetaError>;
}

/// Records ordered by expiry, so the sweeper sleeps until the next one instead of scanning.
#[async_trait]
pub trait ExpiryIndex: Send + Sync {
    async fn next_expiry(&self) -> Result<Option<i64>, MetaError>;
    /// Up to `limit` records that expire at or before `now_ms`.
    async fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<FirmwareRecord>, MetaError>;
}

/// Every metadata concern of the service.
pub trait MetaStore: FirmwareCatalog + ExpiryIndex {}
impl<T: FirmwareCatalog + ExpiryIndex> MetaStore for T {}

/// Opens the configured backend; the one place that matches on it.
pub async fn open(backend: &MetaBackend) -> Result<Arc<dyn MetaStore>, MetaError> {
    match backend {
        MetaBackend::Sled(path) => Ok(Arc::new(sled_store::SledStore::open(path.clone()).await?)),
    }
}

#[cfg(test)]
pub(crate) mod suite {
    //! The behaviour every backend must show; each backend's tests call `run`.
    use super::*;

    fn record(name: &str, blob: &str, expires: Option<i64>) -> FirmwareRecord {
        FirmwareRecord {
            name: name.into(),
            size: 10,
            sha256: "00".repeat(32),
            content_type: "application/octet-stream".into(),
            description: None,
            version: None,
            created_at_ms: 1,
            retention_secs: expires.map(|_| 1),
            expires_at_ms: expires,
            signature_key_id: "k".into(),
            signature: "s".into(),
            blob_key: blob.into(),
        }
    }

    pub async fn run(store: &dyn MetaStore) {
        assert_eq!(store.get("a").await.unwrap(), None);
        let a = record("a", "b1", Some(5000));
        assert_eq!(store.insert_new(&a).await.unwrap(), None);
        assert_eq!(
            store.insert_new(&record("a", "b2", None)).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.get("a").await.unwrap(), Some(a.clone()));
        for n in ["ab", "b", "aa"] {
            store.insert_new(&record(n, n, Some(3000))).await.unwrap();
        }
        let names = |v: Vec<FirmwareRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(store.list("a", None, 10).await.unwrap()),
            ["a", "aa", "ab"]
        );
        assert_eq!(names(store.list("a", Some("a"), 1).await.unwrap()), ["aa"]);
        assert_eq!(names(store.list("", Some("ab"), 10).await.unwrap()), ["b"]);
        assert_eq!(store.totals().await.unwrap(), (4, 40));

        assert_eq!(store.next_expiry().await.unwrap(), Some(3000));
        assert_eq!(
            names(store.expired(2999, 10).await.unwrap()),
            Vec::<String>::new()
        );
        let mut due = names(store.expired(3000, 10).await.unwrap());
        due.sort();
        assert_eq!(due, ["aa", "ab", "b"]);

        // Moving an expiry moves its index entry.
        let mut a2 = a.clone();
        a2.expires_at_ms = Some(1000);
        assert!(store.update(&a2).await.unwrap());
        assert_eq!(store.next_expiry().await.unwrap(), Some(1000));
        a2.expires_at_ms = None;
        assert!(store.update(&a2).await.unwrap());
        assert_eq!(store.next_expiry().await.unwrap(), Some(3000));
        assert!(!store
            .update(&record("a", "other-blob", None))
            .await
            .unwrap());

        assert!(!store.remove("aa", "wrong-blob").await.unwrap());
        assert!(store.remove("aa", "aa").await.unwrap());
        assert!(store.remove("ab", "ab").await.unwrap());
        assert!(store.remove("b", "b").await.unwrap());
        assert_eq!(store.next_expiry().await.unwrap(), None);
        assert_eq!(store.get("aa").await.unwrap(), None);
        assert_eq!(store.totals().await.unwrap(), (1, 10));
    }
}
