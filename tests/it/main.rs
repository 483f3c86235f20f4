//! The one integration test binary: drives the real `executor` binary and real servers on
//! loopback. Each area has its own module.

mod common;
mod coordinator;
mod microvm;
mod package;
mod server;
