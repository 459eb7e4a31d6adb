//! A named group of devices: a static list of ids, or a filter over the registry that devices
//! enter and leave as their tags, attributes and reported firmware change.

use serde::{Deserialize, Serialize};

use super::device::Device;
use super::filter::Filter;

/// Most device ids a static group may list.
pub const MAX_STATIC: usize = 100_000;

/// What a group holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Members {
    Devices(Vec<String>),
    Filter(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    pub name: String,
    pub members: Members,
    pub description: Option<String>,
    pub updated_ms: i64,
}

/// A group or target ready to test devices against.
pub enum Selector {
    /// Sorted ids.
    Devices(Vec<String>),
    Filter(Filter),
}

impl Selector {
    /// Compiles a stored definition; a stored filter parsed when it was saved.
    pub fn of(members: &Members) -> Result<Selector, super::filter::FilterError> {
        Ok(match members {
            Members::Devices(ids) => {
                let mut ids = ids.clone();
                ids.sort();
                ids.dedup();
                Selector::Devices(ids)
            }
            Members::Filter(f) => Selector::Filter(Filter::parse(f)?),
        })
    }

    pub fn contains(&self, d: &Device) -> bool {
        match self {
            Selector::Devices(ids) => ids.binary_search(&d.device_id).is_ok(),
            Selector::Filter(f) => f.matches(d),
        }
    }
}
