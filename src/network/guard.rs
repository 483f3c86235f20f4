//! What keeps job links from harming the host beyond the egress policy, in the order setup
//! applies it:
//!
//! - **ARP**: a table `arp executor` whose set `jobs` holds each slot's link and job address
//!   (`"exn<n>" . <address>`, added with the job's map element). ARP arriving on a job link with
//!   any other sender address is dropped before the kernel learns a neighbour from it, so a job
//!   (root in a microVM guest, say) cannot fill the host's neighbour table, which is global to
//!   the kernel, with forged senders.
//! - **Forwarding**: jobs need IPv4 forwarding for their NAT, and it is a host-wide switch.
//!   Where the executor turned it on (it was off; remembered in `network/forwarding-turned-on`
//!   of the state directory), the forward chain ends in a drop of every IPv4 packet that is
//!   neither from nor to a job link, so the host routes for no one else (Docker sets FORWARD to
//!   DROP for the same reason). Where forwarding was on before (a router, a Docker host), the
//!   host's own forwarding rules stay in charge, and `validate` says so.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::netlink::{self, NFPROTO_ARP};
use super::{nft, nft_list, IF_PREFIX, TABLE};

/// The comment of the forward chain's last rule, by which it is found.
pub(crate) const FOREIGN_COMMENT: &str = "not a job's";

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The ARP table, made once per host (network namespace).
pub(crate) fn arp_script() -> String {
    format!(
        "table arp {TABLE} {{
  set jobs {{ type ifname . ipv4_addr; }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname . arp saddr ip @jobs accept
    iifname \"{IF_PREFIX}*\" drop
  }}
}}
"
    )
}

/// Lets ARP from the job address of a link in (`key`: [`netlink::ifname_addr_key`]).
pub(crate) fn allow_arp(key: &[u8]) -> Result<()> {
    let mut nf = netlink::Socket::netfilter()?;
    if nf.add_element_of(NFPROTO_ARP, TABLE, "jobs", key).is_ok() {
        return Ok(());
    }
    nft(&arp_script(), "creating nftables table arp executor")?;
    nf.add_element_of(NFPROTO_ARP, TABLE, "jobs", key)
        .context("adding the job's link to nftables set arp executor jobs")
}

/// Removes a free slot's ARP element (none there: not an error).
pub(crate) fn forget_arp(key: &[u8]) -> Result<()> {
    match netlink::Socket::netfilter()?.del_element_of(NFPROTO_ARP, TABLE, "jobs", key) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).context("removing a free link from nftables set arp executor jobs"),
    }
}

fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join("network").join("forwarding-turned-on")
}

/// Whether forwarding is the host's own (on, and not turned on by this executor).
pub(crate) fn host_routes(state_dir: &Path) -> bool {
    fs::read_to_string(FORWARD).is_ok_and(|v| v.trim() == "1") && !marker(state_dir).exists()
}

/// Whether this process checked the forward chain's last rule already.
static FOREIGN_DROP_CHECKED: AtomicBool = AtomicBool::new(false);

/// The table was made again: its forward chain needs the drop again.
pub(crate) fn table_made() {
    FOREIGN_DROP_CHECKED.store(false, Ordering::SeqCst);
}

/// Turns IPv4 forwarding on for the jobs' NAT. Where it was off, this executor owns it: the
/// forward chain gets its final drop of what is not a job's first (fail closed), then
/// forwarding goes on.
pub(crate) fn enable_forwarding(state_dir: &Path) -> Result<()> {
    let on = fs::read_to_string(FORWARD).is_ok_and(|v| v.trim() == "1");
    if !on {
        let m = marker(state_dir);
        fs::write(&m, "the executor turned IPv4 forwarding on\n")
            .with_context(|| format!("writing {}", m.display()))?;
    }
    if marker(state_dir).exists() && !FOREIGN_DROP_CHECKED.load(Ordering::SeqCst) {
        let chain = nft_list(&["chain", "inet", TABLE, "forward"]).unwrap_or_default();
        if !chain.contains(FOREIGN_COMMENT) {
            nft(
                &format!(
                    "add rule inet {TABLE} forward meta nfproto ipv4 drop comment \"{FOREIGN_COMMENT}\"\n"
                ),
                "dropping forwarded traffic that is not a job's",
            )?;
        }
        FOREIGN_DROP_CHECKED.store(true, Ordering::SeqCst);
    }
    if !on {
        fs::write(FORWARD, "1").context("turning on IPv4 forwarding")?;
    }
    Ok(())
}

/// `validate`'s line about forwarding.
pub(crate) fn forwarding_line(state_dir: &Path) -> String {
    let on = fs::read_to_string(FORWARD).is_ok_and(|v| v.trim() == "1");
    match (on, host_routes(state_dir)) {
        (false, _) => {
            "network forwarding: off (the executor turns it on at the first job, and drops forwarded \
                       traffic that is not a job's)"
                .into()
        }
        (true, true) => {
            "network forwarding: on, by the host itself: forwarded traffic that is not a job's is left \
                         to the host's own rules (docs/network.md)"
                .into()
        }
        (true, false) => {
            "network forwarding: on, by the executor: forwarded traffic that is not a job's is dropped".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_from_a_job_link_is_let_in_only_from_its_address() {
        let s = arp_script();
        let accept = s.find("iifname . arp saddr ip @jobs accept").unwrap();
        let drop = s.find("iifname \"exn*\" drop").unwrap();
        assert!(accept < drop, "{s}");
        assert!(s.contains("type ifname . ipv4_addr"), "{s}");
        assert!(s.contains("hook input"), "{s}");
    }
}
