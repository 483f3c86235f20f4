//! The guest side of the microVM runtime: the agent that runs as PID 1 inside each VM (the
//! `executor-guest-agent` binary, src/bin/) and the protocol it speaks with the host.
//!
//! Files, bottom to top (none names a file above it): `protocol` (frames), `boot` (the kernel
//! command line the host writes and the guest reads), `devices` (modules and devices), `net`
//! (the job's network), `identity` (machine id, a restored VM's reseed), `root` (a step's root and output), `caches` (the job's dependency caches in a step's root),
//! `engine` (a step in the guest's
//! container engine), `agent` (PID 1).

pub mod agent;
pub(crate) mod boot;
pub(crate) mod caches;
pub(crate) mod devices;
pub(crate) mod engine;
pub(crate) mod identity;
pub(crate) mod net;
pub mod protocol;
pub(crate) mod root;
