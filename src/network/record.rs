//! The job network record: what the run document keeps about one job's network, so that a later
//! process (the step that reaches it, the teardown that removes it) finds it again.

use serde::{Deserialize, Serialize};

/// One job's network (see `network`): its namespace (named as the sandbox), its /30 slot in
/// the pool, the host end of its veth, its addresses and resolvers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobNetwork {
    pub sandbox: String,
    pub slot: u32,
    pub host_if: String,
    pub gateway: std::net::Ipv4Addr,
    pub address: std::net::Ipv4Addr,
    pub dns: Vec<std::net::Ipv4Addr>,
}
