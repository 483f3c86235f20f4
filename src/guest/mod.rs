//! The guest side of the microVM runtime: the agent that runs as PID 1 inside each VM (the
//! `executor-guest-agent` binary, src/bin/) and the protocol it speaks with the host.

pub mod agent;
pub mod net;
pub mod protocol;
