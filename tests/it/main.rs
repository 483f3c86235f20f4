//! The one integration test binary: drives the real `executor` binary and real servers on
//! loopback. Each area has its own module.

mod common;
mod conformance;
mod console;
mod coordinator;
mod dropin;
mod fuzz;
pub mod gitserve;
mod image;
mod microvm;
mod network;
mod oci;
pub mod oci_root;
mod package;
mod pipeline;
mod replicas;
mod server;
mod workspace;
