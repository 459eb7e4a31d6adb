//! The domain model, below the stores and the engine: FOTA tasks with their LwM2M states and
//! transitions, maintenance schedules, the protocols a package URI uses, and the fleet (devices,
//! the filters that group them, campaigns). The metadata stores keep these; the engine and
//! the fleet drive them.

pub mod campaign;
pub mod device;
pub mod filter;
pub mod group;
pub mod protocol;
pub mod roster;
pub mod schedule;
pub mod task;
