//! A bounded, shared in-memory cache of hot images. Devices fetch the same few images
//! thousands of times in small pieces (HTTP ranges, CoAP blocks); serving each piece as a
//! slice of one shared `Bytes` costs no store access and no copy. Loads are single-flight:
//! a thousand devices asking at once read the image once.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use tokio::sync::OnceCell;

use crate::blob::{BlobError, BlobStore};

struct Entry {
    cell: Arc<OnceCell<Bytes>>,
    size: u64,
    last_used: AtomicU64,
}

/// Entries by blob key, then by the offset their range starts at: a lookup borrows the key
/// instead of formatting one, since every HTTP range and CoAP block makes one.
type Entries = HashMap<String, HashMap<u64, Arc<Entry>>>;

/// The cache; `max_bytes == 0` turns it off.
pub struct ImageCache {
    entries: Mutex<Entries>,
    max_bytes: u64,
    max_image: u64,
    clock: AtomicU64,
}

impl ImageCache {
    pub fn new(max_bytes: u64, max_image: u64) -> ImageCache {
        ImageCache {
            entries: Mutex::new(HashMap::new()),
            max_bytes,
            max_image: max_image.min(max_bytes),
            clock: AtomicU64::new(0),
        }
    }

    /// Whether anything is kept (`cache.max_bytes` above 0).
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// Whether an image of `size` bytes is served from memory.
    pub fn admits(&self, size: u64) -> bool {
        size > 0 && size <= self.max_image
    }

    /// The whole image at `key`, loading it once if needed. `None` if it is too large.
    pub async fn get(
        &self,
        blobs: &BlobStore,
        key: &str,
        size: u64,
    ) -> Result<Option<Bytes>, BlobError> {
        if !self.admits(size) {
            return Ok(None);
        }
        self.get_range(blobs, key, 0..size).await.map(Some)
    }

    /// `range` of the blob at `key`, loaded once and kept as one entry. Callers keep ranges
    /// aligned (whole images, or fixed read-ahead chunks) so entries are reused.
    pub async fn get_range(
        &self,
        blobs: &BlobStore,
        key: &str,
        range: Range<u64>,
    ) -> Result<Bytes, BlobError> {
        let size = range.end - range.start;
        let start = range.start;
        let entry = self.entry(key, start, size);
        let bytes = entry
            .cell
            .get_or_try_init(|| async {
                let mut buf = BytesMut::with_capacity(size as usize);
                let mut stream = blobs.read(key, range).await?;
                while let Some(chunk) = stream.try_next().await? {
                    buf.extend_from_slice(&chunk);
                }
                Ok::<_, BlobError>(buf.freeze())
            })
            .await;
        match bytes {
            Ok(b) => Ok(b.clone()),
            Err(e) => {
                let mut map = self.lock();
                if let Some(ranges) = map.get_mut(key) {
                    ranges.remove(&start);
                    if ranges.is_empty() {
                        map.remove(key);
                    }
                }
                Err(e)
            }
        }
    }

    /// Drops everything cached of a blob (deleted or expired).
    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, key: &str, start: u64, size: u64) -> Arc<Entry> {
        let now = self.clock.fetch_add(1, Relaxed);
        let mut map = self.lock();
        if let Some(e) = map.get(key).and_then(|ranges| ranges.get(&start)) {
            e.last_used.store(now, Relaxed);
            return Arc::clone(e);
        }
        // Evict least recently used entries until the new one fits.
        let mut used: u64 = map.values().flat_map(|r| r.values()).map(|e| e.size).sum();
        while used + size > self.max_bytes {
            let Some((k, at)) = map
                .iter()
                .flat_map(|(k, r)| r.iter().map(move |(at, e)| (k, *at, e)))
                .min_by_key(|(_, _, e)| e.last_used.load(Relaxed))
                .map(|(k, at, _)| (k.clone(), at))
            else {
                break;
            };
            if let Some(ranges) = map.get_mut(&k) {
                if let Some(e) = ranges.remove(&at) {
                    used -= e.size;
                }
                if ranges.is_empty() {
                    map.remove(&k);
                }
            }
        }
        let e = Arc::new(Entry {
            cell: Arc::new(OnceCell::new()),
            size,
            last_used: AtomicU64::new(now),
        });
        map.entry(key.to_owned())
            .or_default()
            .insert(start, Arc::clone(&e));
        e
    }

    /// Bytes held (for metrics and tests).
    pub fn held_bytes(&self) -> u64 {
        self.lock()
            .values()
            .flat_map(|r| r.values())
            .filter(|e| e.cell.initialized())
            .map(|e| e.size)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlobBackend, S3Config};

    async fn put(store: &BlobStore, key: &str, data: &[u8]) {
        let mut w = store.writer(key).await.unwrap();
        w.write(Bytes::copy_from_slice(data)).await.unwrap();
        w.finish().await.unwrap();
    }

    #[tokio::test]
    async fn serves_slices_evicts_lru_and_skips_large() {
        let store = BlobStore::open(&BlobBackend::Memory, &S3Config::default()).unwrap();
        for (k, n) in [("a", 400), ("b", 400), ("c", 400), ("big", 2000)] {
            put(&store, k, &vec![k.as_bytes()[0]; n]).await;
        }
        let cache = ImageCache::new(1000, 1000);
        let a = cache.get(&store, "a", 400).await.unwrap().unwrap();
        assert_eq!(&a[..], &[b'a'; 400][..]);
        cache.get(&store, "b", 400).await.unwrap().unwrap();
        // Touch a, so b is the least recently used when c arrives.
        cache.get(&store, "a", 400).await.unwrap().unwrap();
        cache.get(&store, "c", 400).await.unwrap().unwrap();
        assert_eq!(cache.held_bytes(), 800);
        let keys: Vec<String> = cache.lock().keys().cloned().collect();
        assert!(
            keys.contains(&"a".to_owned()) && keys.contains(&"c".to_owned()),
            "{keys:?}"
        );
        cache.remove("a");
        assert_eq!(cache.held_bytes(), 400);
        // A chunk of an image too large to cache whole.
        let part = cache.get_range(&store, "big", 1000..1500).await.unwrap();
        assert_eq!(&part[..], &[b'b'; 500][..]);
        cache.get_range(&store, "big", 0..100).await.unwrap();
        assert_eq!(cache.held_bytes(), 1000, "c and two chunks of big");
        cache.remove("big");
        assert_eq!(cache.held_bytes(), 400, "both chunks of big dropped");
        assert!(cache.get(&store, "big", 2000).await.unwrap().is_none());
        assert!(cache.get(&store, "missing", 10).await.is_err());
        assert!(!cache.lock().contains_key("missing"));
        let off = ImageCache::new(0, 0);
        assert!(off.get(&store, "a", 400).await.unwrap().is_none());
    }
}
