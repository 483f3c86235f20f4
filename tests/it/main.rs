//! The one integration test binary: drives the real `executor` binary and real servers on
//! loopback. Each area has its own module.

mod backends;
mod cache;
mod clisteps;
mod common;
pub(crate) mod conformance;
mod console;
mod coordinator;
mod debug;
mod dropin;
mod fuzz;
pub mod gitserve;
mod host_security;
mod image;
pub(crate) mod microvm;
mod network;
mod network_allowlist;
mod oci;
pub mod oci_root;
mod package;
mod pipeline;
mod proxy;
mod replicas;
mod server;
mod soak;
mod trace;
mod workspace;
