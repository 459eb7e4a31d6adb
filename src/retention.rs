//! The retention sweeper: sleeps until the next stored expiry (or a change to one), deletes
//! what expired, and stops when the shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::firmware::{now_ms, Repository};

/// After a failed pass, wait this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub async fn run(repo: Arc<Repository>, max_sleep: Duration, cancel: CancellationToken) {
    loop {
        let sleep = match pass(&repo).await {
            Ok(Some(next)) => Duration::from_millis((next - now_ms()).max(0) as u64).min(max_sleep),
            Ok(None) => max_sleep,
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep failed");
                RETRY_AFTER
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = repo.expiry_changed.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

async fn pass(repo: &Repository) -> Result<Option<i64>, crate::firmware::FirmwareError> {
    let now = now_ms();
    repo.sweep_expired(now).await?;
    repo.next_expiry(now).await
}
