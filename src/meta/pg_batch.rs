//! Group commit for PostgreSQL statements: the calls of one kind that arrive while a
//! statement of that kind is running go together in the next one (a multi-row `UPDATE … FROM
//! unnest(…)`, an `INSERT … SELECT`, a `WHERE key = ANY(…)`), one statement and one commit
//! for all of them instead of one each. The first call of a quiet moment goes at once, so a
//! lone call waits for nothing; under load the batches grow with it. Each caller gets its own
//! answer, and none is answered before the statement that carried its item has committed.
//! The kinds themselves are in `pg_batched`.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::postgres::PgStore;
use super::MetaError;

/// One kind of statement that many callers' items can share.
pub(super) trait Kind: Send + Sync + 'static {
    type Item: Send + 'static;
    type Out: Send + 'static;
    /// The most items one statement carries.
    const MAX: usize = 256;

    /// Two items with the same key never share a statement (the later waits for the next),
    /// and a statement takes its items in key order, so two instances' statements lock
    /// their rows in the same order and cannot deadlock.
    fn key(_item: &Self::Item) -> Option<&str> {
        None
    }

    /// One answer per item, in the items' order.
    fn run(
        store: &PgStore,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Vec<Result<Self::Out, MetaError>>> + Send;
}

type Waiting<K> = (
    <K as Kind>::Item,
    oneshot::Sender<Result<<K as Kind>::Out, MetaError>>,
);

struct Queue<K: Kind> {
    waiting: Vec<Waiting<K>>,
    /// Whether a writer is draining the queue. One at a time: a second one would split the
    /// batches and cost the database more statements for the same work (measured).
    writing: bool,
    /// Statements run so far.
    batches: u64,
}

/// The items of one kind waiting, and whether a writer is at work on them.
pub(super) struct Batcher<K: Kind>(Arc<Mutex<Queue<K>>>);

impl<K: Kind> Default for Batcher<K> {
    fn default() -> Self {
        Batcher(Arc::new(Mutex::new(Queue {
            waiting: Vec::new(),
            writing: false,
            batches: 0,
        })))
    }
}

impl<K: Kind> Clone for Batcher<K> {
    fn clone(&self) -> Self {
        Batcher(self.0.clone())
    }
}

impl<K: Kind> Batcher<K> {
    /// `item`'s answer, once the statement that carried it has committed.
    pub async fn run(&self, store: &PgStore, item: K::Item) -> Result<K::Out, MetaError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
            q.waiting.push((item, tx));
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            // The writer runs on its own, so a caller that goes away cannot strand the
            // others' answers.
            let (this, store) = (self.clone(), store.clone());
            tokio::spawn(async move { this.write_all(&store).await });
        }
        rx.await
            .unwrap_or_else(|_| Err(MetaError::Backend("statement writer gone".into())))
    }

    /// Statements run so far.
    #[cfg(test)]
    pub fn batches(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).batches
    }

    /// Runs statements until the queue is empty.
    async fn write_all(&self, store: &PgStore) {
        loop {
            let (items, answers): (Vec<_>, Vec<_>) = {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                if q.waiting.is_empty() {
                    q.writing = false;
                    return;
                }
                let mut batch = Vec::new();
                let mut rest = Vec::new();
                let mut keys = HashSet::new();
                for item in q.waiting.drain(..) {
                    let fresh = K::key(&item.0).is_none_or(|k| keys.insert(k.to_owned()));
                    if batch.len() < K::MAX && fresh {
                        batch.push(item);
                    } else {
                        rest.push(item);
                    }
                }
                q.waiting = rest;
                q.batches += 1;
                batch.sort_by(|a, b| K::key(&a.0).cmp(&K::key(&b.0)));
                batch.into_iter().unzip()
            };
            let mut outs = K::run(store, items).await.into_iter();
            for tx in answers {
                let out = outs.next().unwrap_or_else(|| {
                    Err(MetaError::Backend("statement left an item out".into()))
                });
                let _ = tx.send(out);
            }
        }
    }
}

/// The same error for each of `n` items.
pub(super) fn all_failed<T>(n: usize, e: &MetaError) -> Vec<Result<T, MetaError>> {
    (0..n)
        .map(|_| Err(MetaError::Backend(e.to_string())))
        .collect()
}
