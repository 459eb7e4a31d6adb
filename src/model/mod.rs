//! The FOTA task model, below the stores and the engine: tasks with their LwM2M states and
//! transitions, maintenance schedules, and the protocols a package URI uses. The metadata
//! stores keep these; the engine drives them.

pub mod protocol;
pub mod schedule;
pub mod task;
