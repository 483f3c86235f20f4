//! The base layer: small utilities that know nothing of jobs, sandboxes or coordinators, and
//! import nothing else of this crate. Everything above builds on them.

pub mod cancel;
pub mod exit;
pub mod fs;
pub mod lock;
pub mod log;
pub mod metrics;
pub mod proc;
pub mod redact;
pub mod secret;
pub(crate) mod sys;
pub mod units;

// The tests' capability skips live in the `testkit` dev crate; the unit tests name them here.
#[cfg(test)]
pub(crate) use testkit::skip;
