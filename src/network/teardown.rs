//! A job network's end ([`teardown`]: the resolver, the namespace, the egress record, the
//! connection-tracking entries, the slot; the slow part deferred where the loop holds
//! [`super::defer_cleanup`]'s guard) and the janitor's sweep of what crashed executors left
//! ([`janitor`]).

use anyhow::{bail, Context, Result};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use super::*;

/// Removes a job's network: the namespace, which takes the veth pair with it (the kernel
/// removes both ends in the background once no process uses the namespace), and its slot. The
/// slot's map element stays: it matches only a link of this slot's name with this slot's
/// address, which exists only while a job holds the slot, and taking an element out costs the
/// kernel an RCU grace period (about 15 ms); [`janitor`] removes the elements of free slots.
/// The address's connection-tracking entries are forgotten before the slot is free; in a
/// process that holds [`defer_cleanup`]'s guard that, and reaping the resolver, happen after
/// this returns (`cleanup.rs`). Missing parts are not errors.
pub fn teardown(state_dir: &Path, net: &JobNetwork) -> Result<()> {
    teardown_timed(state_dir, net, &mut Vec::new())
}

/// [`teardown`], recording how long each step took.
pub fn teardown_timed(state_dir: &Path, net: &JobNetwork, t: &mut Timings) -> Result<()> {
    teardown_with(state_dir, net, t, cleanup::deferring(state_dir))
}

fn teardown_with(state_dir: &Path, net: &JobNetwork, t: &mut Timings, defer: bool) -> Result<()> {
    // An allowlist job's resolver first: signalled, it answers nothing more. Inline its log is
    // complete once it is gone; deferred, the cleanup takes out of the sets whatever it still
    // wrote after the record was read, before the slot is free.
    let resolver = timed(t, "resolver", || {
        let pid = dns::kill(state_dir, &net.sandbox);
        if !defer {
            pid.into_iter().for_each(dns::reap);
        }
        Ok(pid)
    })?;
    timed(t, "namespace", || netlink::del_netns(net.netns()))
        .with_context(|| format!("removing the network of sandbox {}", net.sandbox))?;
    if !net.address.is_unspecified() {
        if let Err(e) = timed(t, "egress record", || egress::gather(state_dir, &net.sandbox, net.address)) {
            tracing::warn!("gathering the egress record of sandbox {}: {e:#}", net.sandbox);
        }
    }
    if defer {
        let task = cleanup::Task {
            state_dir: state_dir.to_path_buf(),
            net: net.clone(),
            resolver,
            forget: conntrack::forget,
        };
        if cleanup::defer(task) {
            return Ok(());
        }
        // Nothing defers any more (the guard went meanwhile): inline, as a stage alone.
        if let Some(pid) = resolver {
            dns::reap(pid);
            let _ = egress::forget_answers(net.address);
        }
    }
    // The job's flows would follow its address to the slot's next job.
    if !net.address.is_unspecified() {
        if let Err(e) = timed(t, "conntrack", || conntrack::forget(net.address)) {
            tracing::warn!("forgetting the connection-tracking entries of sandbox {}: {e:#}", net.sandbox);
        }
        if resolver.is_some() {
            // A late reply counted after the record was read (nothing marks its flow now).
            let _ = egress::forget_received(net.address);
        }
    }
    free_slot(state_dir, net)
}

/// Whether the slot file of `net` still names its sandbox.
pub(super) fn slot_is(state_dir: &Path, net: &JobNetwork) -> bool {
    let slot = slots_dir(state_dir).join(net.slot.to_string());
    fs::read_to_string(slot).is_ok_and(|text| parse_slot(&text).0 == net.sandbox)
}

/// Frees the slot of `net`, if it still names its sandbox.
pub(super) fn free_slot(state_dir: &Path, net: &JobNetwork) -> Result<()> {
    if slot_is(state_dir, net) {
        let slot = slots_dir(state_dir).join(net.slot.to_string());
        fs::remove_file(&slot).with_context(|| format!("freeing network slot {}", net.slot))?;
    }
    Ok(())
}

/// Removes every trace of a job's network at once: map element, veth, namespace, slot.
fn remove_now(state_dir: &Path, net: &JobNetwork) -> Result<()> {
    let mut errors = Vec::new();
    if !net.address.is_unspecified() {
        let key = netlink::ifname_addr_key(&net.host_if, net.address);
        match netlink::Socket::netfilter().map(|mut s| s.del_element(TABLE, "jobs", &key)) {
            Ok(Ok(())) | Ok(Err(nix::errno::Errno::ENOENT)) => {}
            Ok(Err(e)) => errors.push(format!("its nftables map element: {e}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
        if let Err(e) = guard::forget_arp(&key) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = netlink::Socket::route().and_then(|mut s| s.del_link(&net.host_if)) {
        errors.push(format!("{e:#}"));
    }
    // Inline: the janitor frees the slot only once the flows are forgotten.
    if let Err(e) = teardown_with(state_dir, net, &mut Vec::new(), false) {
        errors.push(format!("{e:#}"));
    }
    // No `complete` will take the record of a network the janitor removes.
    let _ = egress::take(state_dir, &net.sandbox);
    if !errors.is_empty() {
        bail!("the network of sandbox {} was not removed: {}", net.sandbox, errors.join("; "));
    }
    Ok(())
}

/// The map's elements, as (slot, link, address), from `nft list map`.
fn map_elements() -> Vec<(u32, String, Ipv4Addr)> {
    let text = nft_list(&["map", "inet", TABLE, "jobs"]).unwrap_or_default();
    let Some(body) = text.split("elements = {").nth(1) else { return vec![] };
    let mut out = Vec::new();
    for item in body.split(',') {
        // "exn3" . 10.255.0.14 : jump policy_...
        let mut w = item.split_whitespace();
        let (Some(name), Some("."), Some(addr)) = (w.next(), w.next(), w.next()) else { continue };
        let name = name.trim_matches('"');
        let Some(slot) = name.strip_prefix(IF_PREFIX).and_then(|n| n.parse().ok()) else { continue };
        if let Ok(a) = addr.parse() {
            out.push((slot, name.to_string(), a));
        }
    }
    out
}

/// The host's links named `exn<slot>`.
fn job_links() -> Vec<(u32, String)> {
    let Ok(out) = crate::base::proc::command("ip").args(["-o", "link", "show"]).stdin(Stdio::null()).output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter_map(|n| Some((n.strip_prefix(IF_PREFIX)?.parse().ok()?, n.clone())))
        .collect()
}

/// Removes the networks of sandboxes that `owned` claims and that are not running, found by
/// the slot files of this state directory (a slot is taken before anything else is made, so a
/// kill at any point of setup leaves one). Namespaces are never judged by name alone: another
/// executor on the host may use the same sandbox prefix. Returns the sandboxes.
pub fn janitor(state_dir: &Path, owned: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let dir = slots_dir(state_dir);
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.flatten() {
            let Some(slot) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(text) = fs::read_to_string(e.path()) else { continue };
            let (name, address) = parse_slot(&text);
            // A slot whose teardown's deferred end still runs is that cleanup's (cleanup.rs).
            if !owned(&name) || cleanup::is_pending(&name) {
                continue;
            }
            let net = JobNetwork {
                sandbox: name.clone(),
                slot,
                host_if: format!("{IF_PREFIX}{slot}"),
                gateway: Ipv4Addr::UNSPECIFIED,
                address: address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                dns: vec![],
            };
            remove_now(state_dir, &net).with_context(|| format!("removing the stale network of {name}"))?;
            removed.push(name);
        }
    }
    // The map elements and links of free slots: what teardowns leave for the kernel or for
    // here, and what a kill left. Under the lock, so that no setup takes a slot meanwhile.
    // Only where this state directory ever had a job network: an executor without one must not
    // judge the host's job links.
    if !dir.is_dir() || which::which("nft").is_err() || !nix::unistd::geteuid().is_root() {
        return Ok(removed);
    }
    let _lock = crate::base::lock::lock(&state_dir.join("network").join("lock"), true)?;
    let free = |slot: u32| !dir.join(slot.to_string()).exists();
    let stale: Vec<_> = map_elements().into_iter().filter(|(slot, ..)| free(*slot)).collect();
    if !stale.is_empty() {
        let mut nf = netlink::Socket::netfilter()?;
        for (_, link, addr) in stale {
            let key = netlink::ifname_addr_key(&link, addr);
            match nf.del_element(TABLE, "jobs", &key) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => bail!("removing the map element of free link {link}: {e}"),
            }
            guard::forget_arp(&key)?;
        }
    }
    let links: Vec<_> = job_links().into_iter().filter(|(slot, _)| free(*slot)).collect();
    if !links.is_empty() {
        let mut rt = netlink::Socket::route()?;
        for (_, link) in links {
            rt.del_link(&link)?;
        }
    }
    Ok(removed)
}
