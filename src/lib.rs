//! fwrepo: a firmware artifact repository and FOTA service.

pub mod auth;
pub mod blob;
pub mod cache;
pub mod cli;
pub mod client;
pub mod coap;
pub mod config;
pub mod console;
pub mod digest;
pub mod error;
pub mod firmware;
pub mod fleet;
pub mod fota;
pub mod http;
pub mod keys;
pub mod late_digests;
pub mod mcuboot;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod name;
pub mod retention;
pub mod server;
pub mod spool;
pub mod tls;
pub mod uploads;
