//! The microVM's job network (`EXECUTOR_NETWORK=internet`): the job's link is a TAP device in
//! the host's namespace (`network::setup_tap`: the same slot, map element and policy as an oci
//! job's veth), handed to QEMU as an open descriptor so that QEMU keeps running as its
//! unprivileged user; the guest agent configures the address, the route and resolv.conf from
//! the kernel command line (`executor.net`, see [`guest_net`]). The boot (boot.rs) records the
//! network and hands the TAP to QEMU (qemu.rs).

use anyhow::{Context, Result};
use std::os::fd::OwnedFd;

use super::RuntimeOptions;
use crate::guest::boot::GuestNet;
use crate::network::{JobNetwork, Mode, Reach, JOB_PREFIX};

/// What a VM boot needs to know to give the VM a network.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetRequest<'a> {
    /// The job's coordinator URL and upload endpoints, which the policy lets the job reach.
    pub reach: Reach<'a>,
}

/// The request for a job VM under these options: `None` for `EXECUTOR_NETWORK=none`.
pub(crate) fn request<'a>(opts: &RuntimeOptions, reach: Reach<'a>) -> Option<NetRequest<'a>> {
    (opts.network.mode != Mode::None).then_some(NetRequest { reach })
}

/// A VM's network while it boots: the record, and the TAP until QEMU holds it.
pub(crate) struct VmNet {
    pub net: JobNetwork,
    pub tap: OwnedFd,
}

/// A VM's network could not be made (no free slot, say): the host's doing, not the VM's, so a
/// restore that fails with it says nothing about the snapshot.
#[derive(Debug, thiserror::Error)]
#[error("setting up the VM's network (EXECUTOR_NETWORK={mode})")]
pub(crate) struct NetSetupFailed {
    mode: String,
}

/// Makes the TAP, its addresses and its firewall entry for VM `name`.
pub(crate) fn setup(opts: &RuntimeOptions, name: &str, req: &NetRequest) -> Result<VmNet> {
    let (net, tap) = crate::network::setup_tap(&opts.state_dir, name, &opts.network, req.reach)
        .context(NetSetupFailed { mode: format!("{:?}", opts.network.mode).to_lowercase() })?;
    Ok(VmNet { net, tap })
}

/// Whether `e` is a failure to make a VM's network ([`NetSetupFailed`]).
pub(crate) fn is_setup_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<NetSetupFailed>().is_some()
}

/// The guest's view of a job network, as the kernel command line carries it to the agent
/// (`crate::guest::boot`).
pub(crate) fn guest_net(net: &JobNetwork) -> GuestNet {
    GuestNet { address: net.address, prefix: JOB_PREFIX, gateway: net.gateway, dns: net.dns.clone() }
}

/// Removes the network of a VM that is gone (its TAP went with QEMU).
pub(crate) fn teardown(opts: &RuntimeOptions, net: &JobNetwork) -> Result<()> {
    crate::network::teardown(&opts.state_dir, net)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore that failed for want of a network is told apart from one the snapshot failed,
    /// through any context added above it.
    #[test]
    fn a_network_failure_is_known_through_its_context() {
        let e = Err::<(), _>(anyhow::anyhow!("no free network slot"))
            .context(NetSetupFailed { mode: "internet".into() })
            .context("booting VM x")
            .unwrap_err();
        assert!(is_setup_failure(&e));
        assert_eq!(
            format!("{e:#}"),
            "booting VM x: setting up the VM's network (EXECUTOR_NETWORK=internet): no free network slot"
        );
        assert!(!is_setup_failure(&anyhow::anyhow!("the snapshot's SHA-256 does not match")));
    }

    /// The `executor.net=` value the host wrote before `BootParams` carried it.
    #[test]
    fn the_guest_gets_the_network_value_it_always_got() {
        let net = JobNetwork {
            sandbox: "executor-1".into(),
            slot: 3,
            host_if: "ex-3".into(),
            gateway: "10.255.0.13".parse().unwrap(),
            address: "10.255.0.14".parse().unwrap(),
            dns: vec!["198.51.100.53".parse().unwrap(), "192.0.2.53".parse().unwrap()],
        };
        let value = format!("executor.net={}", guest_net(&net).to_value());
        assert_eq!(value, net.guest_cmdline());
        assert_eq!(value, "executor.net=10.255.0.14/30,10.255.0.13,198.51.100.53,192.0.2.53");
    }
}
