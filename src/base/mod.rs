//! The base layer: small utilities that know nothing of jobs, sandboxes or coordinators, and
//! import nothing else of this crate. Everything above builds on them.

pub(crate) mod addr;
pub mod cancel;
pub(crate) mod exit;
pub(crate) mod fs;
pub(crate) mod http;
pub(crate) mod lock;
pub(crate) mod log;
pub(crate) mod metrics;
pub mod proc;
pub(crate) mod redact;
pub(crate) mod secret;
pub(crate) mod sys;
pub(crate) mod trace;
pub(crate) mod units;

// The tests' capability skips live in the `testkit` dev crate; the unit tests name them here.
#[cfg(test)]
pub(crate) use testkit::skip;
