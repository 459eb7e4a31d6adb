//! Integration tests: real fwrepo servers on 127.0.0.1 ephemeral ports.

mod access;
mod cli;
mod coap_interop;
mod coap_protocol;
mod common;
mod crash;
mod ddi;
mod device_identity;
mod download;
mod dtls;
mod errors;
mod fleet;
mod fota;
mod fota_coap;
mod fuzz;
mod lifecycle;
mod mcuboot;
mod postgres;
mod resumable;
mod s3;
mod slowloris;
mod spec;
mod ssrf;
mod swupdate;
mod upload;
