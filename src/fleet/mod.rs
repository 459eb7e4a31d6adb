//! Fleets: the device registry, groups, and campaigns that roll one firmware out to many
//! devices in waves. Campaign tasks are ordinary FOTA tasks the engine creates and drives;
//! this module decides which devices get one and when (`driver`), from counts the stores
//! keep in step with every task transition.
//!
//! `registry` holds devices and groups, `campaigns` the operators' side of campaigns,
//! `driver` the loop that releases devices, advances waves and stops a failing rollout.

mod campaigns;
mod driver;
mod registry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Kind;
use crate::firmware::Repository;
use crate::fota::{Clock, Engine, FotaError};
use crate::meta::{MetaError, MetaStore};
use crate::model::campaign::{Campaign, LifecycleError};
use crate::model::filter::FilterError;
use crate::model::group::Selector;

pub use campaigns::{CampaignEvent, CampaignRequest, StopRequest};
pub use registry::{device_json, ImportReport};

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("device {0:?} is not in the registry")]
    NoDevice(String),
    #[error("no group named {0:?}")]
    NoGroup(String),
    #[error("campaign {0:?} not found")]
    NoCampaign(String),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("campaign {0} kept changing under concurrent requests; try again")]
    Stale(String),
    #[error(transparent)]
    Fota(#[from] FotaError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl FleetError {
    /// Stable code and the kind of failure (mapped to HTTP and CoAP in `crate::error`).
    pub fn code(&self) -> (&'static str, Kind) {
        match self {
            FleetError::Invalid { .. } => ("invalid-parameter", Kind::BadRequest),
            FleetError::Filter(_) => ("invalid-filter", Kind::BadRequest),
            FleetError::NoDevice(_) => ("device-not-found", Kind::NotFound),
            FleetError::NoGroup(_) => ("group-not-found", Kind::NotFound),
            FleetError::NoCampaign(_) => ("campaign-not-found", Kind::NotFound),
            FleetError::Lifecycle(LifecycleError::SelfApproval(_)) => {
                ("self-approval", Kind::Forbidden)
            }
            FleetError::Lifecycle(LifecycleError::NeedsApproval) => {
                ("approval-required", Kind::Conflict)
            }
            FleetError::Lifecycle(_) => ("campaign-state", Kind::Conflict),
            FleetError::Stale(_) => ("concurrent-change", Kind::Conflict),
            FleetError::Fota(e) => e.code(),
            FleetError::Meta(_) => ("metadata-unavailable", Kind::Unavailable),
        }
    }
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> FleetError {
    FleetError::Invalid {
        field,
        message: message.into(),
    }
}

/// Events a slow subscriber may fall behind before it is told it lagged.
const EVENT_BUFFER: usize = 1024;

/// The fleet service.
pub struct Fleet {
    store: Arc<dyn MetaStore>,
    engine: Arc<Engine>,
    repo: Arc<Repository>,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<Arc<CampaignEvent>>,
    /// Wakes the driver: a campaign task moved, an operator acted, a device joined.
    wake: Notify,
    /// Live campaigns as the driver last read them, with their compiled targets (for
    /// late joiners, which must cost little on every idle device's poll).
    live: Mutex<Vec<(Campaign, Arc<Selector>)>>,
    /// Compiled targets by campaign id.
    selectors: Mutex<HashMap<String, Arc<Selector>>>,
    cancel: CancellationToken,
    work: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fleet {
    pub fn new(
        store: Arc<dyn MetaStore>,
        engine: Arc<Engine>,
        repo: Arc<Repository>,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
        work: TaskTracker,
    ) -> Arc<Fleet> {
        Arc::new(Fleet {
            store,
            engine,
            repo,
            clock,
            events: broadcast::channel(EVENT_BUFFER).0,
            wake: Notify::new(),
            live: Mutex::new(Vec::new()),
            selectors: Mutex::new(HashMap::new()),
            cancel,
            work,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CampaignEvent>> {
        self.events.subscribe()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}
