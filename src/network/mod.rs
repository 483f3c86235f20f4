//! Per-job networks: a network namespace with one veth toward the host, a /30 of its own from
//! the pool, a default route, NAT out of the host's default route, and the egress policy in one
//! nftables table owned by the executor (`inet executor`). Set up in this order by [`setup`],
//! removed by [`teardown`], and found again after a crash by [`janitor`]. docs/network.md has
//! the rules in the same order.

mod bandwidth;
mod cleanup;
pub(crate) mod conntrack;
pub(crate) mod dns;
pub mod egress;
pub(crate) mod guard;
pub mod hosts;
pub(crate) mod netlink;
pub(crate) mod policy;
mod record;
mod teardown;
mod validate;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

pub use bandwidth::Bandwidth;
pub use cleanup::{defer_cleanup, CleanupGuard};
pub use dns::{keep_spare as keep_spare_resolver, SpareGuard};
pub use policy::{Allow, Cidr, Reach};
use teardown::{free_slot, slot_is};
pub use teardown::{janitor, teardown, teardown_timed};
pub use validate::check;

/// The executor's table.
pub const TABLE: &str = "executor";
/// Host-side veth names start with this (then the slot number); the table matches them by it.
pub const IF_PREFIX: &str = "exn";
/// The default pool of job subnets.
pub const DEFAULT_POOL: &str = "10.255.0.0/16";
/// Prefix of each job's subnet: a /30 (network, gateway, job, broadcast).
pub const JOB_PREFIX: u8 = 30;

/// `EXECUTOR_NETWORK`: what a sandbox's network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Loopback only.
    None,
    /// The public internet through the egress policy.
    Internet,
    /// Only the names of `EXECUTOR_NETWORK_ALLOW_HOSTS`, through the job's own resolver
    /// (`dns`), after the same refusals as `internet`.
    Allowlist,
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s.trim() {
            "none" => Ok(Mode::None),
            "internet" => Ok(Mode::Internet),
            "allowlist" => Ok(Mode::Allowlist),
            other => bail!("network mode {other:?} is unknown (want internet, allowlist or none)"),
        }
    }
}

/// The default of `EXECUTOR_NETWORK` (an executor configured without it): the internet.
pub const DEFAULT_MODE: Mode = Mode::Internet;

/// The network settings of every job of an executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// `EXECUTOR_NETWORK_CIDR`: the pool the job subnets come from.
    pub pool: Cidr,
    /// `EXECUTOR_NETWORK_ALLOW`: destinations allowed despite the private-range rules.
    pub allow: Vec<Allow>,
    /// `EXECUTOR_DNS_SERVERS`, else the host's non-loopback upstreams (empty: no DNS).
    pub dns: Vec<Ipv4Addr>,
    /// `EXECUTOR_NETWORK_BANDWIDTH`: caps per job (none: uncapped).
    pub bandwidth: Option<Bandwidth>,
    /// `EXECUTOR_NETWORK_ALLOW_HOSTS`: the names an `allowlist` job may reach.
    pub hosts: Vec<hosts::HostRule>,
    /// The bounds of an `allowlist` job's resolver.
    pub dns_limits: DnsLimits,
}

/// `EXECUTOR_NETWORK_DNS_GRACE`, `_RATE` and `_MAX_NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    pub grace_s: u64,
    pub rate: u32,
    pub max_name: usize,
}

impl Default for DnsLimits {
    fn default() -> Self {
        DnsLimits { grace_s: 30, rate: 50, max_name: 128 }
    }
}

impl Default for Settings {
    /// Loopback only: the library's default (runtimes built in code, tests, `vm` commands). An
    /// executor's configuration defaults to [`DEFAULT_MODE`] through [`Settings::parse`].
    fn default() -> Self {
        Settings {
            mode: Mode::None,
            pool: Cidr::parse(DEFAULT_POOL).unwrap_or(Cidr::ANY),
            allow: vec![],
            dns: vec![],
            bandwidth: None,
            hosts: vec![],
            dns_limits: DnsLimits::default(),
        }
    }
}

impl Settings {
    /// Validates the raw values (`None` for unset).
    pub fn parse(
        mode: Option<&str>,
        pool: Option<&str>,
        allow: Option<&str>,
        dns: Option<&str>,
    ) -> Result<Settings> {
        let nonempty = |v: Option<&str>| v.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        let mode = match nonempty(mode) {
            Some(m) => m.parse().context("EXECUTOR_NETWORK")?,
            None => DEFAULT_MODE,
        };
        let pool = Cidr::parse(&nonempty(pool).unwrap_or_else(|| DEFAULT_POOL.into()))
            .context("EXECUTOR_NETWORK_CIDR")?;
        if pool.prefix > JOB_PREFIX {
            bail!("EXECUTOR_NETWORK_CIDR {pool} is smaller than one /{JOB_PREFIX} job subnet");
        }
        let allow = match nonempty(allow) {
            Some(a) => a
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Allow::parse)
                .collect::<Result<Vec<_>>>()
                .context("EXECUTOR_NETWORK_ALLOW")?,
            None => vec![],
        };
        let dns = match nonempty(dns) {
            Some(d) => d
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<Ipv4Addr>()
                        .with_context(|| format!("EXECUTOR_DNS_SERVERS: {s:?} is not an IPv4 address"))
                })
                .collect::<Result<Vec<_>>>()?,
            None => host_resolvers(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default()).0,
        };
        if let Some(l) = dns.iter().find(|a| a.is_loopback()) {
            bail!("EXECUTOR_DNS_SERVERS names {l}, a loopback address no sandbox can reach");
        }
        Ok(Settings {
            mode,
            pool,
            allow,
            dns,
            bandwidth: None,
            hosts: vec![],
            dns_limits: DnsLimits::default(),
        })
    }

    /// The settings with `EXECUTOR_NETWORK_BANDWIDTH` (`None` or empty: uncapped).
    pub fn with_bandwidth(mut self, raw: Option<&str>) -> Result<Settings> {
        self.bandwidth = raw.map(str::trim).filter(|s| !s.is_empty()).map(Bandwidth::parse).transpose()?;
        Ok(self)
    }

    /// The settings with `EXECUTOR_NETWORK_ALLOW_HOSTS` and the resolver's bounds; the names
    /// need the `allowlist` mode.
    pub fn with_hosts(mut self, raw: Option<&str>, limits: DnsLimits) -> Result<Settings> {
        self.hosts = hosts::parse_list(raw.unwrap_or("")).context("EXECUTOR_NETWORK_ALLOW_HOSTS")?;
        if !self.hosts.is_empty() && self.mode != Mode::Allowlist {
            bail!(
                "EXECUTOR_NETWORK_ALLOW_HOSTS is set but EXECUTOR_NETWORK is {:?}: the names apply only to \
                 EXECUTOR_NETWORK=allowlist",
                self.mode
            );
        }
        self.dns_limits = limits;
        Ok(self)
    }

    /// How many jobs the pool holds at once.
    pub fn slots(&self) -> u32 {
        1u32 << (JOB_PREFIX - self.pool.prefix).min(31)
    }

    /// The subnet of slot `n`: (gateway, job address).
    pub fn addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.pool.addr) + slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

/// The IPv4 resolvers of a resolv.conf that a sandbox could reach, and the loopback ones it
/// could not (a local stub like systemd-resolved's 127.0.0.53).
pub fn host_resolvers(resolv_conf: &str) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let mut usable = Vec::new();
    let mut loopback = Vec::new();
    for line in resolv_conf.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(a)) = w.next().map(str::parse::<Ipv4Addr>) {
            if a.is_loopback() {
                loopback.push(a);
            } else {
                usable.push(a);
            }
        }
    }
    (usable, loopback)
}

pub use record::JobNetwork;

impl JobNetwork {
    /// The namespace's name under /run/netns.
    pub fn netns(&self) -> &str {
        &self.sandbox
    }
    /// The namespace's path, which a container joins.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.sandbox)
    }
    /// The guest's network as the microVM's kernel command line carries it to the agent:
    /// `executor.net=<address>/<prefix>,<gateway>[,<resolver>...]`.
    pub fn guest_cmdline(&self) -> String {
        let mut v = format!("executor.net={}/{JOB_PREFIX},{}", self.address, self.gateway);
        for d in &self.dns {
            v.push_str(&format!(",{d}"));
        }
        v
    }
    /// The sandbox's /etc/resolv.conf.
    pub fn resolv_conf(&self) -> String {
        let mut s = String::from("# written by the executor: the resolvers this job may reach\n");
        for a in &self.dns {
            s.push_str(&format!("nameserver {a}\n"));
        }
        s.push_str("options timeout:2 attempts:2\n");
        s
    }
}

fn slots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("network").join("slots")
}

/// Runs a command whose failure is an error naming `what`.
fn run(mut cmd: std::process::Command, what: &str, input: Option<&str>) -> Result<()> {
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).with_context(|| format!("{what}: writing its input"))?;
    }
    let out = child.wait_with_output().with_context(|| format!("{what}: waiting"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn nft(script: &str, what: &str) -> Result<()> {
    let mut cmd = crate::base::proc::command("nft");
    cmd.args(["-f", "-"]);
    run(cmd, what, Some(script))
}

/// `nft list ARGS`'s output, `None` when it fails (nothing of that name).
fn nft_list(args: &[&str]) -> Option<String> {
    let out = crate::base::proc::command("nft")
        .arg("list")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the executor's table exists.
fn table_exists() -> bool {
    nft_list(&["table", "inet", TABLE]).is_some()
}

/// Makes the table if it is missing. A table of an older layout (one chain per job) is made
/// again when it holds no job, and is an error naming the fix when it does.
fn ensure_table(pool: &Cidr) -> Result<()> {
    if let Some(map) = nft_list(&["map", "inet", TABLE, "jobs"]) {
        if map.contains(policy::MAP_TYPE) {
            // A table of an executor before the byte counts: its forward chain gets the rule
            // that counts what recorded flows receive (once; idempotent only by this check).
            let forward = nft_list(&["chain", "inet", TABLE, "forward"]).unwrap_or_default();
            if !forward.contains(&format!("@{}", egress::SET_RECEIVED)) {
                nft(&policy::received_upgrade_script(), "counting the bytes recorded flows receive")?;
            }
            return Ok(());
        }
    }
    if table_exists() {
        let t = nft_list(&["table", "inet", TABLE]).unwrap_or_default();
        if t.contains("elements =") {
            bail!(
                "nftables table inet {TABLE} has jobs of an older executor's layout: stop that executor, \
                 run `executor janitor`, then `nft delete table inet {TABLE}`"
            );
        }
        nft(&format!("delete table inet {TABLE}\n"), "removing the old-layout table inet executor")?;
    }
    guard::table_made();
    nft(&policy::table_script(pool), "creating nftables table inet executor")
}

/// `executor install iptables-rules`: makes the executor's nftables table ahead of the first
/// job (each job's setup makes it too when it is missing); a line saying what it did.
pub fn install_table(s: &Settings) -> Result<String> {
    if s.mode == Mode::None {
        return Ok("EXECUTOR_NETWORK=none: jobs get loopback only, so no nftables table is needed".into());
    }
    let missing = missing();
    if !missing.is_empty() {
        bail!("the jobs' network cannot be set up here: {}", missing.join("; "));
    }
    let existed = table_exists();
    ensure_table(&s.pool)?;
    Ok(format!(
        "nftables table inet {TABLE} {} (job pool {}; Sourcegraph's iptables rules and CNI chain are not used)",
        if existed { "is in place" } else { "created" },
        s.pool
    ))
}

/// What the host lacks for the internet mode, each with its fix (empty: nothing).
pub fn missing() -> Vec<String> {
    let mut out = Vec::new();
    if which::which("nft").is_err() {
        out.push("the nft command is not installed (apt-get install nftables)".into());
    }
    if !nix::unistd::geteuid().is_root() {
        out.push("network namespaces and nftables need root".into());
    }
    out
}

/// How long each step of a setup or teardown took (`scripts/bench-network` prints them).
pub type Timings = Vec<(&'static str, std::time::Duration)>;

fn timed<T>(t: &mut Timings, step: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    let r = f();
    t.push((step, start.elapsed()));
    r
}

/// The content of a slot file: the sandbox's name, then the job's address (the janitor needs
/// it to find the map element).
fn slot_text(net: &JobNetwork) -> String {
    format!("{}\n{}\n", net.sandbox, net.address)
}

fn parse_slot(text: &str) -> (String, Option<Ipv4Addr>) {
    let mut l = text.lines();
    let name = l.next().unwrap_or("").to_string();
    (name, l.next().and_then(|a| a.trim().parse().ok()))
}

/// Where this process looks for a free slot first.
static NEXT_SLOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sets up the network of sandbox `sandbox`: the caller tears it down with [`teardown`] if a
/// later step of the sandbox fails. Nothing is left behind when this fails.
pub fn setup(state_dir: &Path, sandbox: &str, s: &Settings, reach: Reach) -> Result<JobNetwork> {
    setup_timed(state_dir, sandbox, s, reach, &mut Vec::new())
}

/// [`setup`], recording how long each step took.
pub fn setup_timed(
    state_dir: &Path,
    sandbox: &str,
    s: &Settings,
    reach: Reach,
    t: &mut Timings,
) -> Result<JobNetwork> {
    take_slot_and_build(state_dir, sandbox, s, reach, t, |net, coord, t| build(state_dir, net, s, coord, t))
}

/// The network of a microVM: the job's link is a TAP device `exn<n>` in the host's namespace
/// (the VM is the sandbox: no namespace of its own), with the gateway address, behind the same
/// map element and policy as a veth. Returns the TAP's descriptor for QEMU; the device goes
/// when the last descriptor of it closes (QEMU's, when the VM ends). The guest configures
/// the job's address itself (what [`JobNetwork`] says).
pub fn setup_tap(
    state_dir: &Path,
    sandbox: &str,
    s: &Settings,
    reach: Reach,
) -> Result<(JobNetwork, std::os::fd::OwnedFd)> {
    let mut tap = None;
    let net = take_slot_and_build(state_dir, sandbox, s, reach, &mut Vec::new(), |net, coord, _| {
        install_firewall(net, s, coord)?;
        let mut host = netlink::Socket::route()?;
        if host.link_index(&net.host_if).is_ok() {
            // A dying VM's TAP of this slot, or a killed executor's: the slot is this job's.
            host.del_link(&net.host_if)?;
        }
        let fd = crate::base::sys::open_tap(&net.host_if)
            .with_context(|| format!("creating TAP device {} (/dev/net/tun)", net.host_if))?;
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", net.host_if), "1");
        let i = host.link_index(&net.host_if)?;
        host.add_address(i, net.gateway, JOB_PREFIX)?;
        host.link_up(i)?;
        guard::enable_forwarding(state_dir)?;
        if let Some(b) = &s.bandwidth {
            cap(&net.host_if, b)?;
        }
        tap = Some(fd);
        Ok(())
    })?;
    let tap = tap.context("the TAP device was not made")?;
    Ok((net, tap))
}

/// Takes a slot and runs `build` on it, under the slot lock; on failure removes what was made.
fn take_slot_and_build(
    state_dir: &Path,
    sandbox: &str,
    s: &Settings,
    reach: Reach,
    t: &mut Timings,
    build: impl FnOnce(&JobNetwork, &[policy::Target], &mut Timings) -> Result<()>,
) -> Result<JobNetwork> {
    let missing = missing();
    if !missing.is_empty() {
        bail!("the job's network cannot be set up: {}", missing.join("; "));
    }
    let coord = policy::targets(reach)?;
    let dir = slots_dir(state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating network slot directory {}", dir.display()))?;
    // The table and the slot are taken under one lock, so two executors of this state
    // directory never create the table twice nor share a slot.
    let lock =
        timed(t, "slot lock", || crate::base::lock::lock(&state_dir.join("network").join("lock"), true))?;
    let mut net = None;
    timed(t, "slot", || {
        // Round robin from after the last slot taken, by any process of this state directory
        // (`network/next-slot`), so that a slot just freed is handed out last: its previous
        // job's veth may still be going (the kernel removes it in the background once the
        // namespace is gone), and what the previous job left elsewhere has the longest to go.
        let next_file = state_dir.join("network").join("next-slot");
        let start = fs::read_to_string(&next_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or_else(|| NEXT_SLOT.load(std::sync::atomic::Ordering::Relaxed))
            % s.slots();
        for n in (start..s.slots()).chain(0..start) {
            let (gateway, address) = s.addresses(n);
            let candidate = JobNetwork {
                sandbox: sandbox.to_string(),
                slot: n,
                host_if: format!("{IF_PREFIX}{n}"),
                gateway,
                address,
                // An allowlist job asks its own resolver, on its gateway, and nothing else.
                dns: if s.mode == Mode::Allowlist { vec![gateway] } else { s.dns.clone() },
            };
            match fs::OpenOptions::new().write(true).create_new(true).open(dir.join(n.to_string())) {
                Ok(mut f) => {
                    f.write_all(slot_text(&candidate).as_bytes())
                        .with_context(|| format!("writing network slot {n}"))?;
                    net = Some(candidate);
                    NEXT_SLOT.store(n + 1, std::sync::atomic::Ordering::Relaxed);
                    let _ = crate::base::fs::write_atomic(&next_file, (n + 1).to_string().as_bytes());
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("taking network slot {n}")),
            }
        }
        Ok(())
    })?;
    let Some(net) = net else {
        // Slots whose teardown's deferred end is still running are taken until it is done
        // (cleanup.rs): worth waiting for, the lock held, before calling the pool full.
        if cleanup::wait_idle() {
            drop(lock);
            return take_slot_and_build(state_dir, sandbox, s, reach, t, build);
        }
        bail!("network pool {} is full: {} jobs have a subnet", s.pool, s.slots());
    };
    let built = build(&net, &coord, t);
    drop(lock);
    let built = built.and_then(|()| {
        if s.mode != Mode::Allowlist {
            return Ok(());
        }
        timed(t, "resolver", || start_resolver(state_dir, &net, s)).map(|_| ())
    });
    if let Err(e) = built {
        let _ = teardown(state_dir, &net);
        return Err(e);
    }
    Ok(net)
}

/// Starts the job's resolver on its gateway (`dns`), forwarding to the settings' upstreams.
fn start_resolver(state_dir: &Path, net: &JobNetwork, s: &Settings) -> Result<u32> {
    if s.dns.is_empty() {
        bail!(
            "EXECUTOR_NETWORK=allowlist needs an upstream resolver: set EXECUTOR_DNS_SERVERS (the host's \
             /etc/resolv.conf names none a job's resolver can use)"
        );
    }
    let cfg = dns::ResolverConfig {
        sandbox: net.sandbox.clone(),
        listen: net.gateway,
        job: net.address,
        host_if: net.host_if.clone(),
        upstream: s.dns.clone(),
        hosts: s.hosts.clone(),
        grace_s: s.dns_limits.grace_s,
        rate: s.dns_limits.rate,
        max_name: s.dns_limits.max_name,
        log: dns::log_file(state_dir, &net.sandbox),
    };
    dns::start(state_dir, &cfg)
}

/// The job's element in the map: its link and address, the jump to the settings' policy chain.
fn install_firewall(net: &JobNetwork, s: &Settings, coord: &[policy::Target]) -> Result<()> {
    let (chain, script) = policy::policy_chain(s, coord);
    let key = netlink::ifname_addr_key(&net.host_if, net.address);
    // ARP from the link is let in only from the job's address (guard.rs).
    guard::allow_arp(&key)?;
    let mut nf = netlink::Socket::netfilter()?;
    if nf.add_jump_element(TABLE, "jobs", &key, &chain).is_ok() {
        return Ok(());
    }
    // The table, the map or this policy chain is not there yet (the first job of the host or
    // of these settings), or a killed executor left this slot's element: make them, then again.
    ensure_table(&s.pool)?;
    nft(&script, "installing the job policy chain")?;
    match nf.add_jump_element(TABLE, "jobs", &key, &chain) {
        // The slot's element from a job of other settings.
        Err(nix::errno::Errno::EEXIST | nix::errno::Errno::EBUSY) => {
            let _ = nf.del_element(TABLE, "jobs", &key);
            nf.add_jump_element(TABLE, "jobs", &key, &chain)
        }
        r => r,
    }
    .with_context(|| format!("adding the job's element to nftables map inet {TABLE} jobs"))
}

/// The steps of [`setup`] once the slot is taken, in order.
fn build(
    state_dir: &Path,
    net: &JobNetwork,
    s: &Settings,
    coord: &[policy::Target],
    t: &mut Timings,
) -> Result<()> {
    let hif = &net.host_if;
    // 1. The firewall first: the job's element in the dispatch map exists before the link
    //    does, so no packet of the job ever passes unfiltered (fail closed).
    timed(t, "nftables element", || install_firewall(net, s, coord))?;
    // 2. The namespace (IPv6 off in it), the veth pair, the host end addressed and up with
    //    IPv6 off.
    let (ns_file, mut inside) = timed(t, "namespace", || netlink::add_netns(net.netns()))?;
    timed(t, "veth, host side", || {
        let mut host = netlink::Socket::route()?;
        if host.link_index(hif).is_ok() {
            // The slot's previous veth, still being removed by the kernel with its namespace,
            // or left by a killed executor: the slot is this job's, so the link goes.
            host.del_link(hif)?;
        }
        host.add_veth(hif, "eth0", &ns_file)?;
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{hif}/disable_ipv6"), "1");
        let i = host.link_index(hif)?;
        host.add_address(i, net.gateway, JOB_PREFIX)?;
        host.link_up(i)
    })
    .context("creating the job's veth")?;
    // 3. Inside: loopback and eth0 up, the job's address and its default route.
    timed(t, "job side", || {
        let lo = inside.link_index("lo")?;
        inside.link_up(lo)?;
        let e = inside.link_index("eth0")?;
        inside.add_address(e, net.address, JOB_PREFIX)?;
        inside.link_up(e)?;
        inside.add_default_route(e, net.gateway)
    })
    .context("configuring the job's side of the veth")?;
    // 4. Forwarding on, for the NAT out of the host's default route (where the executor turns
    //    it on, nothing but jobs' traffic is forwarded: guard.rs).
    timed(t, "forwarding", || guard::enable_forwarding(state_dir))?;
    // 5. The bandwidth caps, if any.
    if let Some(b) = &s.bandwidth {
        timed(t, "bandwidth caps", || cap(hif, b))?;
    }
    Ok(())
}

/// Caps link `dev` with `tc` (one process; only when caps are set).
fn cap(dev: &str, b: &Bandwidth) -> Result<()> {
    let mut cmd = crate::base::proc::command("tc");
    cmd.args(["-batch", "-"]);
    run(cmd, &format!("capping the bandwidth of {dev} (tc, iproute2)"), Some(&b.tc_script(dev)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse_bad_values() {
        let s = Settings::parse(
            Some("internet"),
            Some("10.9.0.0/24"),
            Some("10.1.2.3:5000, 192.168.0.0/16"),
            Some("198.51.100.53"),
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Internet);
        assert_eq!(s.slots(), 64);
        assert_eq!(s.addresses(1), ("10.9.0.5".parse().unwrap(), "10.9.0.6".parse().unwrap()));
        assert_eq!(s.allow.len(), 2);
        assert_eq!(s.allow[0].port, Some(5000));
        assert_eq!(s.dns, vec!["198.51.100.53".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(Settings::parse(None, None, None, Some("1.1.1.1")).unwrap().mode, Mode::Internet);
        assert_eq!(Settings::default().mode, Mode::None, "runtimes made in code stay loopback-only");
        assert!(Settings::parse(Some("wifi"), None, None, Some("1.1.1.1")).is_err());
        assert!(Settings::parse(None, Some("10.0.0.0/31"), None, Some("1.1.1.1")).is_err());
        assert!(Settings::parse(None, None, None, Some("127.0.0.53")).is_err());
        assert!(Settings::parse(None, None, Some("10.0.0.1:99999"), Some("1.1.1.1")).is_err());
    }

    #[test]
    fn resolvers_split_into_usable_and_loopback() {
        let (u, l) =
            host_resolvers("# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch x\n");
        assert_eq!(u, vec!["10.0.0.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(l, vec!["127.0.0.53".parse::<Ipv4Addr>().unwrap()]);
    }
}
