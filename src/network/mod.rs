//! Per-job networks: a network namespace with one veth toward the host, a /30 of its own from
//! the pool, a default route, NAT out of the host's default route, and the egress policy in one
//! nftables table owned by the executor (`inet executor`). Set up in this order by [`setup`],
//! removed by [`teardown`], and found again after a crash by [`janitor`]. docs/network.md has
//! the rules in the same order.

pub mod policy;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

pub use policy::{Allow, Cidr};

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
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s.trim() {
            "none" => Ok(Mode::None),
            "internet" => Ok(Mode::Internet),
            other => bail!("network mode {other:?} is unknown (want internet or none)"),
        }
    }
}

/// The default of `EXECUTOR_NETWORK`: `none` until every runtime has the internet mode proven
/// (see docs/network.md).
pub const DEFAULT_MODE: Mode = Mode::None;

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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: DEFAULT_MODE,
            pool: Cidr::parse(DEFAULT_POOL).unwrap_or(Cidr::ANY),
            allow: vec![],
            dns: vec![],
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
        Ok(Settings { mode, pool, allow, dns })
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

pub use crate::document::sandbox::JobNetwork;

impl JobNetwork {
    /// The namespace's name under /run/netns.
    pub fn netns(&self) -> &str {
        &self.sandbox
    }
    /// The namespace's path, which a container joins.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.sandbox)
    }
    /// The job's own chain in the table.
    pub fn chain(&self) -> String {
        format!("job{}", self.slot)
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

fn ip_batch(netns: Option<&str>, script: &str, what: &str) -> Result<()> {
    let mut cmd = crate::base::proc::command("ip");
    if let Some(n) = netns {
        cmd.args(["-n", n]);
    }
    cmd.args(["-batch", "-"]);
    run(cmd, what, Some(script))
}

/// Whether the executor's table exists.
fn table_exists() -> bool {
    crate::base::proc::command("nft")
        .args(["list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What the host lacks for the internet mode, each with its fix (empty: nothing).
pub fn missing() -> Vec<String> {
    let mut out = Vec::new();
    for (bin, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        if which::which(bin).is_err() {
            out.push(format!("the {bin} command is not installed (apt-get install {pkg})"));
        }
    }
    if !crate::base::skip::is_root() {
        out.push("network namespaces and nftables need root".into());
    }
    out
}

/// Sets up the network of sandbox `sandbox`: the caller tears it down with [`teardown`] if a
/// later step of the sandbox fails. Nothing is left behind when this fails.
pub fn setup(state_dir: &Path, sandbox: &str, s: &Settings, coordinator: Option<&str>) -> Result<JobNetwork> {
    let missing = missing();
    if !missing.is_empty() {
        bail!("the job's network cannot be set up: {}", missing.join("; "));
    }
    let dir = slots_dir(state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating network slot directory {}", dir.display()))?;
    // The table and the slot are taken under one lock, so two executors of this state
    // directory never create the table twice nor share a slot.
    let _lock = crate::base::lock::lock(&state_dir.join("network").join("lock"), true)?;
    let mut slot = None;
    for n in 0..s.slots() {
        match fs::OpenOptions::new().write(true).create_new(true).open(dir.join(n.to_string())) {
            Ok(mut f) => {
                f.write_all(sandbox.as_bytes()).with_context(|| format!("writing network slot {n}"))?;
                slot = Some(n);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("taking network slot {n}")),
        }
    }
    let Some(slot) = slot else {
        bail!("network pool {} is full: {} jobs have a subnet", s.pool, s.slots());
    };
    let (gateway, address) = s.addresses(slot);
    let net = JobNetwork {
        sandbox: sandbox.to_string(),
        slot,
        host_if: format!("{IF_PREFIX}{slot}"),
        gateway,
        address,
        dns: s.dns.clone(),
    };
    let built = build(&net, s, coordinator);
    drop(_lock);
    if let Err(e) = built {
        let _ = teardown(state_dir, &net);
        return Err(e);
    }
    Ok(net)
}

/// The steps of [`setup`] once the slot is taken, in order.
fn build(net: &JobNetwork, s: &Settings, coordinator: Option<&str>) -> Result<()> {
    let ns = net.netns();
    let hif = &net.host_if;
    // 1. The firewall first: the job's chain and its entry in the dispatch map exist before
    //    the link does, so no packet of the job ever passes unfiltered (fail closed).
    let coord = coordinator.map(policy::coordinator_target).transpose()?.flatten();
    let script = policy::job_script(net, s, coord.as_ref());
    // One nft run when the table is there (each run costs about 10 ms); the table is made
    // first when it is not.
    if nft(&script, "installing the job's nftables rules").is_err() {
        if !table_exists() {
            nft(&policy::table_script(&s.pool), "creating nftables table inet executor")?;
        }
        nft(&script, "installing the job's nftables rules")?;
    }
    // 2. The namespace and the veth pair, the host end addressed and up, IPv6 off on it.
    ip_batch(
        None,
        &format!(
            "netns add {ns}\nlink add {hif} type veth peer name eth0 netns {ns}\n\
             addr add {gw}/{JOB_PREFIX} dev {hif}\nlink set {hif} up\n",
            gw = net.gateway
        ),
        "creating the job's network namespace and veth",
    )?;
    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{hif}/disable_ipv6"), "1");
    // 3. Inside: IPv6 off, loopback and eth0 up, the job's address and its default route.
    disable_ipv6_in(&net.netns_path())?;
    ip_batch(
        Some(ns),
        &format!(
            "link set lo up\naddr add {a}/{JOB_PREFIX} dev eth0\nlink set eth0 up\n\
             route add default via {gw} dev eth0\n",
            a = net.address,
            gw = net.gateway
        ),
        "configuring the job's side of the veth",
    )?;
    // 4. Forwarding on, for the NAT out of the host's default route.
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("turning on IPv4 forwarding")?;
    Ok(())
}

/// Switches IPv6 off in a namespace (the sandbox gets none, so no IPv6 rule can be missed).
fn disable_ipv6_in(netns: &Path) -> Result<()> {
    let f =
        fs::File::open(netns).with_context(|| format!("opening network namespace {}", netns.display()))?;
    let t = std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the job's namespace")?;
        for k in ["all", "default"] {
            // /proc/sys/net shows the namespace of the thread that opens it.
            fs::write(format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6"), "1")
                .with_context(|| format!("switching IPv6 off ({k}) in the job's namespace"))?;
        }
        Ok(())
    });
    t.join().map_err(|_| anyhow::anyhow!("the IPv6 thread panicked"))?
}

/// Removes a job's network: its rules, the namespace (which takes the veth pair with it), the
/// host link if it survived, and its slot. Missing parts are not errors.
pub fn teardown(state_dir: &Path, net: &JobNetwork) -> Result<()> {
    let mut errors = Vec::new();
    // One transaction for the usual case; piece by piece when part is already gone.
    let whole = format!(
        "delete element inet {TABLE} jobs {{ \"{hif}\" }}\nflush chain inet {TABLE} {c}\ndelete chain inet {TABLE} {c}\n",
        hif = net.host_if,
        c = net.chain()
    );
    if nft(&whole, "removing the job's nftables rules").is_err() && table_exists() {
        // Each command alone: a missing element must not stop the chain's removal.
        for cmd in [
            format!("delete element inet {TABLE} jobs {{ \"{}\" }}", net.host_if),
            format!("flush chain inet {TABLE} {}", net.chain()),
            format!("delete chain inet {TABLE} {}", net.chain()),
        ] {
            let present = policy::has_chain(&net.chain()) || cmd.starts_with("delete element");
            if present {
                let _ = nft(&cmd, "removing the job's nftables rules");
            }
        }
        if policy::has_chain(&net.chain()) {
            errors.push(format!("nftables chain {} is still there", net.chain()));
        }
    }
    // The veth pair first: a deleted namespace frees its devices only later, asynchronously,
    // and the next job of the slot needs the name. `-force` goes on past a missing part.
    let mut cmd = crate::base::proc::command("ip");
    cmd.args(["-force", "-batch", "-"]);
    let _ = run(
        cmd,
        "removing the job's veth and namespace",
        Some(&format!("link del {}\nnetns del {}\n", net.host_if, net.netns())),
    );
    if Path::new("/run/netns").join(net.netns()).exists() {
        errors.push(format!("network namespace {} is still there", net.netns()));
    }
    let slot = slots_dir(state_dir).join(net.slot.to_string());
    if fs::read_to_string(&slot).is_ok_and(|owner| owner == net.sandbox) {
        fs::remove_file(&slot).with_context(|| format!("freeing network slot {}", net.slot))?;
    }
    if !errors.is_empty() {
        bail!("the network of sandbox {} was not removed: {}", net.sandbox, errors.join("; "));
    }
    Ok(())
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
            let Ok(name) = fs::read_to_string(e.path()) else { continue };
            if !owned(&name) {
                continue;
            }
            let net = JobNetwork {
                sandbox: name.clone(),
                slot,
                host_if: format!("{IF_PREFIX}{slot}"),
                gateway: Ipv4Addr::UNSPECIFIED,
                address: Ipv4Addr::UNSPECIFIED,
                dns: vec![],
            };
            teardown(state_dir, &net).with_context(|| format!("removing the stale network of {name}"))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// `validate`'s lines about the network, or an error naming what is missing.
pub fn check(s: &Settings) -> Result<Vec<String>> {
    let mut out = vec![format!("network: {:?}", s.mode).to_lowercase()];
    let (_, stubs) = host_resolvers(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    if s.mode == Mode::None {
        return Ok(out);
    }
    let missing = missing();
    if !missing.is_empty() {
        bail!("EXECUTOR_NETWORK=internet cannot work here: {}", missing.join("; "));
    }
    out.push(format!("network pool {}: {} job subnets of /{JOB_PREFIX}", s.pool, s.slots()));
    if s.dns.is_empty() {
        let why = if stubs.is_empty() {
            "/etc/resolv.conf names no IPv4 resolver".to_string()
        } else {
            format!(
                "/etc/resolv.conf names only the loopback stub {} (systemd-resolved or similar), which a \
                 sandbox cannot reach: set EXECUTOR_DNS_SERVERS to the stub's upstream servers",
                stubs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            )
        };
        out.push(format!("network dns: none: {why}; jobs can reach addresses but resolve no names"));
    } else {
        out.push(format!(
            "network dns: {}",
            s.dns.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    let fwd = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    out.push(format!(
        "network forwarding: {}",
        if fwd.trim() == "1" { "on" } else { "off (the executor turns it on at the first job)" }
    ));
    out.push(format!(
        "network table inet {TABLE}: {}",
        if table_exists() { "present" } else { "not yet created" }
    ));
    Ok(out)
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
        assert_eq!(Settings::parse(None, None, None, Some("1.1.1.1")).unwrap().mode, DEFAULT_MODE);
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
