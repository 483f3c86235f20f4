//! The microVM's job network (`EXECUTOR_NETWORK=internet`): the job's link is a TAP device in
//! the host's namespace (`network::setup_tap`: the same slot, map element and policy as an oci
//! job's veth), handed to QEMU as an open descriptor so that QEMU keeps running as its
//! unprivileged user; the guest agent configures the address, the route and resolv.conf from
//! the kernel command line. Kept apart from the boot code so that the VM pool (network `none`
//! only) and this change meet in a few lines.

use anyhow::{Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

use super::RuntimeOptions;
use crate::network::{JobNetwork, Mode};

/// What a VM boot needs to know to give the VM a network.
#[derive(Debug, Clone, Copy)]
pub struct NetRequest<'a> {
    /// The job's coordinator URL, which the policy lets the job reach.
    pub coordinator: Option<&'a str>,
}

/// The request for a job VM under these options: `None` for `EXECUTOR_NETWORK=none`.
pub fn request<'a>(opts: &RuntimeOptions, coordinator: Option<&'a str>) -> Option<NetRequest<'a>> {
    (opts.network.mode == Mode::Internet).then_some(NetRequest { coordinator })
}

/// A VM's network while it boots: the record, and the TAP until QEMU holds it.
pub struct VmNet {
    pub net: JobNetwork,
    pub tap: OwnedFd,
}

/// Makes the TAP, its addresses and its firewall entry for VM `name`.
pub fn setup(opts: &RuntimeOptions, name: &str, req: &NetRequest) -> Result<VmNet> {
    let (net, tap) = crate::network::setup_tap(&opts.state_dir, name, &opts.network, req.coordinator)
        .context("setting up the VM's network (EXECUTOR_NETWORK=internet)")?;
    Ok(VmNet { net, tap })
}

/// QEMU's arguments for the TAP (a virtio-net device on the microvm machine's MMIO bus).
pub fn qemu_args(cmd: &mut Command, v: &VmNet) {
    cmd.arg("-netdev").arg(format!("tap,id=net0,fd={},vhost=off", v.tap.as_raw_fd()));
    cmd.args(["-device", "virtio-net-device,netdev=net0"]);
}

/// Removes the network of a VM that is gone (its TAP went with QEMU).
pub fn teardown(opts: &RuntimeOptions, net: &JobNetwork) -> Result<()> {
    crate::network::teardown(&opts.state_dir, net)
}
