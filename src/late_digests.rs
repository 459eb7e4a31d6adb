//! SHA-1 and MD5 of large images, computed after their upload is answered (see `digest`): one
//! image at a time, read back from the store, so uploads are not slowed by them and the work
//! never piles up. A DDI client that asks for an image first computes them itself
//! (`Repository::with_all_digests`); an image this loop has not reached at shutdown is
//! completed the same way when it is first needed.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::firmware::{FirmwareError, Repository};

pub async fn run(repo: Arc<Repository>, cancel: CancellationToken) {
    loop {
        while let Some(name) = repo.take_digests_wanted() {
            let done = tokio::select! {
                _ = cancel.cancelled() => return,
                done = complete(&repo, &name) => done,
            };
            match done {
                Ok(()) => tracing::debug!(%name, "SHA-1 and MD5 stored"),
                Err(FirmwareError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(%name, error = %e, "SHA-1 and MD5 not computed; the first DDI client to need them will")
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = repo.digests_due.notified() => {}
        }
    }
}

async fn complete(repo: &Repository, name: &str) -> Result<(), FirmwareError> {
    let record = repo.resolve_any(name).await?;
    repo.with_all_digests(record).await.map(drop)
}
