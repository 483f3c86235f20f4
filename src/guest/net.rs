//! The guest's side of a job network (`EXECUTOR_NETWORK=internet`): the host puts
//! `executor.net=<address>/<prefix>,<gateway>[,<resolver>...]` on the kernel command line and
//! gives the VM a virtio-net device on its TAP; the agent loads the driver, switches IPv6 off,
//! gives `eth0` the address and the default route, and writes the resolvers into each step's
//! `/etc/resolv.conf`. Without the parameter nothing happens (loopback only).
//!
//! A snapshot template with a network boots with `executor.nic=1` instead: the driver loads and
//! `eth0` comes up without an address, and each VM restored from the template gets its own
//! address, route and resolvers with the host's `Reseed` ([`readdress`]), after the kernel's
//! entropy and before any job request.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::boot::GuestNet;
use super::devices::{load_modules, wait_for};

/// The network driver and its dependencies, in load order (a list in the initramfs).
pub(crate) const MODULES_NET: &str = "/lib/modules/executor/net";
/// The resolv.conf steps get.
const RESOLV_CONF: &str = "/run/resolv.conf";

/// The resolv.conf of the job's resolvers.
fn resolv_conf(n: &GuestNet) -> String {
    let mut s = String::from("# written by the executor: the resolvers this job may reach\n");
    for d in &n.dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s.push_str("options timeout:2 attempts:2\n");
    s
}

fn ip(args: &[&str]) -> Result<()> {
    let out = crate::base::proc::command("/bin/busybox")
        .arg("ip")
        .args(args)
        .output()
        .context("running busybox ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Configures the network the command line names, if any (called before the first step); for
/// `executor.nic=1` only the device, its address coming with the host's `Reseed`.
pub(crate) fn configure() -> Result<()> {
    let params = super::boot::current()?;
    if params.net.is_none() && !params.nic {
        return Ok(());
    }
    // IPv6 off first: the host drops it anyway, and the guest should not even try.
    for k in ["all", "default"] {
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6"), "1");
    }
    load_modules(MODULES_NET).context("loading the network driver")?;
    wait_for("the network device eth0", Duration::from_secs(30), || {
        Path::new("/sys/class/net/eth0").exists().then_some(())
    })?;
    let _ = fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1");
    ip(&["link", "set", "lo", "up"])?;
    match &params.net {
        Some(n) => address(n),
        None => ip(&["link", "set", "eth0", "up"]),
    }
}

/// Gives `eth0` the address, the default route and the resolvers of `n`.
fn address(n: &GuestNet) -> Result<()> {
    ip(&["addr", "add", &format!("{}/{}", n.address, n.prefix), "dev", "eth0"])?;
    ip(&["link", "set", "eth0", "up"])?;
    ip(&["route", "add", "default", "via", &n.gateway.to_string(), "dev", "eth0"])?;
    fs::write(RESOLV_CONF, resolv_conf(n)).with_context(|| format!("writing {RESOLV_CONF}"))?;
    Ok(())
}

/// A VM restored from a template (`executor.nic=1`) takes its own network, `value` as
/// `executor.net=` writes it: whatever `eth0` held is flushed (addresses, routes and the
/// neighbours, whose gateway was the template's TAP), then the address, the route and the
/// resolvers are set as a cold boot sets them.
pub(crate) fn readdress(value: &str) -> Result<()> {
    if !super::boot::current()?.nic {
        bail!("the host sent a network for a VM booted without a network device");
    }
    let n = GuestNet::parse(value)?;
    ip(&["addr", "flush", "dev", "eth0"])?;
    ip(&["neigh", "flush", "dev", "eth0"])?;
    address(&n)
}

/// Puts the job's resolv.conf into a step's (writable) root, replacing the image's.
pub(crate) fn write_resolv_conf(root: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(RESOLV_CONF) else { return Ok(()) };
    let etc = root.join("etc");
    fs::create_dir_all(&etc).context("creating /etc in the step's root")?;
    let target = etc.join("resolv.conf");
    // The image's may be a symlink (to a systemd-resolved stub): it is replaced, not followed.
    if fs::symlink_metadata(&target).is_ok() {
        fs::remove_file(&target).context("replacing the image's /etc/resolv.conf")?;
    }
    fs::write(&target, text).context("writing the step's /etc/resolv.conf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_names_each_resolver() {
        let n = GuestNet::parse("10.255.0.2/30,10.255.0.1,198.51.100.53,192.0.2.53").unwrap();
        let text = resolv_conf(&n);
        assert!(text.contains("nameserver 198.51.100.53\nnameserver 192.0.2.53\n"), "{text}");
        assert!(text.ends_with("options timeout:2 attempts:2\n"));
    }
}
