//! The FOTA engine: schedules firmware updates for devices, hands each device its package URI
//! when the schedule and quota allow (pull delivery), follows the LwM2M Firmware Update state
//! machine from the reports that arrive, and ends every task in a definite outcome.
//!
//! Tasks live in the metadata store. Deadlines and window openings are index entries there;
//! one timer sleeps until the earliest, so idle tasks cost nothing.

pub mod address;
pub mod cbor;
pub mod clock;
pub mod ddi;
mod engine;
pub mod import;
pub mod report;
pub mod request;
pub mod view;

pub use crate::model::{schedule, task};
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{ConfigMode, Controller, Engine, Joiner, Package, Proof, Work};

use crate::firmware::FirmwareError;
use crate::meta::MetaError;
use import::ImportError;
use report::ReportError;
use request::RequestError;
use schedule::ScheduleError;
use task::TransitionError;

/// Longest device id; LwM2M endpoint names such as `urn:imei:...` fit easily.
pub const MAX_DEVICE_ID: usize = 128;

/// Why a FOTA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FotaError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("device id must be 1-{MAX_DEVICE_ID} printable ASCII characters without spaces, /, ?, # or %")]
    BadDevice,
    #[error("device {device:?} already has an active task {fota_id}")]
    DeviceBusy { device: String, fota_id: String },
    #[error("protocolType {requested} is not served by this deployment; it serves {served}")]
    ProtocolNotServed {
        requested: &'static str,
        served: String,
    },
    #[error("FOTA task {0:?} not found")]
    NotFound(String),
    #[error("firmware {0:?} is not stored and no firmwareUrl was given to import it from")]
    NoFirmware(String),
    #[error("the package of task {0} is not available while the task is {1}")]
    PackageUnavailable(String, &'static str),
    #[error("this package URI needs its token: use the packageUri the task was delivered with")]
    PackageToken,
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("invalid report: {0}")]
    Report(#[from] ReportError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("FOTA task {0} kept changing under concurrent requests; try again")]
    Stale(String),
    #[error("every quota slot is taken")]
    QuotaFull,
    #[error("device {device:?} must present its device token (HTTP: Authorization: Bearer <token>; CoAP: Uri-Query token=<token>){}", if *presented { "; the one given is not this device's" } else { "" })]
    DeviceUnauthenticated { device: String, presented: bool },
    #[error("this session is device {session:?}'s; it cannot act for device {device:?}")]
    OtherDevice { session: String, device: String },
    #[error("device {device:?} has no action {action}")]
    ActionNotFound { device: String, action: u32 },
    #[error("{0}")]
    Feedback(#[from] ddi::FeedbackError),
    #[error("{0}")]
    Attributes(String),
}

impl FotaError {
    /// Stable code and the kind of failure, mapped to HTTP and CoAP in `crate::error`.
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            FotaError::Request(RequestError::Push) => ("push-not-supported", Kind::Unprocessable),
            FotaError::Request(RequestError::Meaningless { .. }) => {
                ("invalid-parameter", Kind::Unprocessable)
            }
            FotaError::Request(_) => ("invalid-parameter", Kind::BadRequest),
            FotaError::BadDevice => ("invalid-device-id", Kind::BadRequest),
            FotaError::DeviceBusy { .. } => ("device-busy", Kind::Conflict),
            FotaError::ProtocolNotServed { .. } => ("protocol-not-served", Kind::Unprocessable),
            FotaError::NotFound(_) => ("fota-not-found", Kind::NotFound),
            FotaError::NoFirmware(_) => ("firmware-not-found", Kind::NotFound),
            FotaError::PackageUnavailable(..) => ("package-unavailable", Kind::NotFound),
            FotaError::PackageToken => ("package-token-invalid", Kind::Unauthorized),
            FotaError::Transition(TransitionError::Finished(_)) => {
                ("task-finished", Kind::Conflict)
            }
            FotaError::Transition(_) => ("transition-not-allowed", Kind::Conflict),
            FotaError::Report(ReportError::Incomplete(_)) => {
                ("invalid-report", Kind::Unprocessable)
            }
            FotaError::Report(_) => ("invalid-report", Kind::BadRequest),
            FotaError::Schedule(e) => e.code(),
            FotaError::Import(e) => e.code(),
            FotaError::Firmware(e) => e.code(),
            FotaError::Meta(_) => ("metadata-unavailable", Kind::Unavailable),
            FotaError::Stale(_) => ("concurrent-change", Kind::Conflict),
            FotaError::QuotaFull => ("quota-full", Kind::Conflict),
            FotaError::DeviceUnauthenticated { .. } => {
                ("device-unauthenticated", Kind::Unauthorized)
            }
            FotaError::OtherDevice { .. } => ("other-device", Kind::Forbidden),
            FotaError::ActionNotFound { .. } => ("action-not-found", Kind::NotFound),
            FotaError::Feedback(_) => ("invalid-feedback", Kind::BadRequest),
            FotaError::Attributes(_) => ("invalid-parameter", Kind::BadRequest),
        }
    }
}

/// Checks a device id from a path.
pub fn check_device(id: &str) -> Result<(), FotaError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"/?#%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FotaError::BadDevice)
    }
}
