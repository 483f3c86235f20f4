//! The guest kernel's command line, the one channel from the host to the guest before the agent
//! port exists: [`BootParams`] is written by the host (`BootParams::to_cmdline`, in the microVM
//! runtime's boot) and read back by the agent (`BootParams::parse` of /proc/cmdline), so that
//! both sides share one definition of every parameter.

use anyhow::{Context, Result};
use std::net::Ipv4Addr;

/// What the guest does with its workspace disk (`executor.workspace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum WorkspaceMount {
    /// `0`: there is no workspace disk; /data is an empty directory.
    #[default]
    None,
    /// `1`: the disk holds the job's workspace; mounted at /data during the boot.
    AtBoot,
    /// `2`: a VM booted ahead of its job; the disk is mounted when the host says so (`Mount`),
    /// once it wrote the job's filesystem into it.
    OnRequest,
}

impl WorkspaceMount {
    fn code(self) -> u8 {
        match self {
            WorkspaceMount::None => 0,
            WorkspaceMount::AtBoot => 1,
            WorkspaceMount::OnRequest => 2,
        }
    }

    fn from_code(v: &str) -> Result<WorkspaceMount> {
        match v {
            "0" => Ok(WorkspaceMount::None),
            "1" => Ok(WorkspaceMount::AtBoot),
            "2" => Ok(WorkspaceMount::OnRequest),
            _ => anyhow::bail!("executor.workspace={v:?} is not 0, 1 or 2"),
        }
    }
}

/// The network the host gave the guest (`executor.net=<address>/<prefix>,<gateway>[,<resolver>...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNet {
    /// The value of `executor.net=`.
    pub(crate) fn parse(v: &str) -> Result<GuestNet> {
        let mut parts = v.split(',');
        let (addr, prefix) = parts
            .next()
            .and_then(|a| a.split_once('/'))
            .with_context(|| format!("executor.net={v:?} has no address/prefix"))?;
        let address = addr.parse().with_context(|| format!("executor.net: bad address {addr:?}"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).context("executor.net: bad prefix")?;
        let gateway = parts
            .next()
            .and_then(|g| g.parse().ok())
            .with_context(|| format!("executor.net={v:?} has no gateway"))?;
        let dns = parts
            .map(|d| d.parse().with_context(|| format!("executor.net: bad resolver {d:?}")))
            .collect::<Result<_>>()?;
        Ok(GuestNet { address, prefix, gateway, dns })
    }

    /// The value of `executor.net=`, as [`GuestNet::parse`] reads it.
    pub(crate) fn to_value(&self) -> String {
        let mut v = format!("{}/{},{}", self.address, self.prefix, self.gateway);
        for d in &self.dns {
            v.push_str(&format!(",{d}"));
        }
        v
    }
}

/// The guest kernel's command line. Each fixed parameter is there for boot time or for a boot
/// that must not hang; `scripts/bench-vm` boots its bare baseline with the same line.
/// - `tsc_early_khz`: microvm has no HPET or PM timer to calibrate the TSC against (without it
///   about one boot in twenty hangs);
/// - `tsc=reliable`: keeps the TSC as the clocksource. Under TCG it is the host's clock, and the
///   clocksource watchdog, comparing it with jiffies that lag behind, would otherwise switch the
///   guest to jiffies (4 ms resolution) half-way through the boot;
/// - `no_timer_check`: a loaded host may delay TCG's timer interrupts past the kernel's IO-APIC
///   timer check, which then panics the guest;
/// - `cryptomgr.notests`: the crypto self-tests cost about half a second under TCG;
/// - `panic=-1 reboot=t` with QEMU's `-no-reboot`: a panic ends QEMU.
///
/// Nothing goes to init: the agent is /init and takes no arguments from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct BootParams {
    /// `executor.images`: how many read-only image disks (`image0`...) to mount at /images/N.
    pub images: u32,
    /// `executor.workspace`.
    pub workspace: WorkspaceMount,
    /// `executor.debug=1`: the kernel is not quiet and the agent prints its boot times.
    pub debug: bool,
    /// `tsc_early_khz`: the host's TSC frequency, when the host knows it.
    pub tsc_khz: Option<u64>,
    /// `executor.net`: the job's network (guest/net.rs), if it has one.
    pub net: Option<GuestNet>,
    /// `executor.nic=1`: the VM has a network device whose address comes later, with the
    /// host's `Reseed` (a snapshot template and every VM restored from it: the command line is
    /// the template's, so it cannot carry each VM's own address).
    pub nic: bool,
    /// `executor.template=1`: a VM booted to be saved as a snapshot; it and every VM restored
    /// from it wait for the host's `Reseed` before any job request (guest/identity.rs).
    pub template: bool,
}

impl BootParams {
    /// The kernel command line carrying these parameters.
    pub(crate) fn to_cmdline(&self) -> String {
        let mut line = String::from("console=ttyS0");
        if !self.debug {
            line.push_str(" quiet");
        }
        line.push_str(" panic=-1 reboot=t tsc=reliable no_timer_check cryptomgr.notests");
        if let Some(khz) = self.tsc_khz {
            line.push_str(&format!(" tsc_early_khz={khz}"));
        }
        line.push_str(&format!(
            " executor.images={} executor.workspace={}",
            self.images,
            self.workspace.code()
        ));
        if self.debug {
            line.push_str(" executor.debug=1");
        }
        if let Some(n) = &self.net {
            line.push_str(&format!(" executor.net={}", n.to_value()));
        }
        if self.nic {
            line.push_str(" executor.nic=1");
        }
        if self.template {
            line.push_str(" executor.template=1");
        }
        line
    }

    /// The parameters of a kernel command line (/proc/cmdline); words that are not these
    /// parameters are ignored, and a parameter that is missing takes its default.
    pub(crate) fn parse(cmdline: &str) -> Result<BootParams> {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "executor.images" => {
                    p.images = value.parse().with_context(|| format!("executor.images={value:?}"))?
                }
                "executor.workspace" => p.workspace = WorkspaceMount::from_code(value)?,
                "executor.debug" => p.debug = true,
                "executor.net" => p.net = Some(GuestNet::parse(value)?),
                "executor.nic" => p.nic = value == "1",
                "executor.template" => p.template = value == "1",
                "tsc_early_khz" => {
                    p.tsc_khz = Some(value.parse().with_context(|| format!("tsc_early_khz={value:?}"))?)
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

/// The parameters this guest booted with (/proc/cmdline, read once); an error when the command
/// line cannot be read or carries a malformed parameter.
pub(crate) fn current() -> Result<&'static BootParams> {
    static PARAMS: std::sync::OnceLock<std::result::Result<BootParams, String>> = std::sync::OnceLock::new();
    PARAMS
        .get_or_init(|| {
            std::fs::read_to_string("/proc/cmdline")
                .context("reading /proc/cmdline")
                .and_then(|l| BootParams::parse(&l))
                .map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the kernel command line: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> GuestNet {
        GuestNet {
            address: Ipv4Addr::new(10, 255, 0, 2),
            prefix: 30,
            gateway: Ipv4Addr::new(10, 255, 0, 1),
            dns: vec![Ipv4Addr::new(198, 51, 100, 53), Ipv4Addr::new(192, 0, 2, 53)],
        }
    }

    #[test]
    fn every_parameter_survives_the_round_trip() {
        let cases = [
            BootParams::default(),
            BootParams {
                images: 2,
                workspace: WorkspaceMount::AtBoot,
                debug: false,
                tsc_khz: Some(1_996_250),
                net: None,
                nic: false,
                template: false,
            },
            BootParams {
                images: 8,
                workspace: WorkspaceMount::OnRequest,
                debug: true,
                tsc_khz: None,
                net: Some(net()),
                nic: false,
                template: true,
            },
            BootParams { net: Some(GuestNet { dns: vec![], ..net() }), ..Default::default() },
            BootParams { template: true, workspace: WorkspaceMount::OnRequest, ..Default::default() },
            BootParams { template: true, nic: true, ..Default::default() },
        ];
        for p in cases {
            assert_eq!(BootParams::parse(&p.to_cmdline()).unwrap(), p, "{}", p.to_cmdline());
        }
    }

    /// The line the host wrote by hand before this struct, word for word.
    #[test]
    fn the_command_line_is_the_one_the_host_always_wrote() {
        let p = BootParams {
            images: 2,
            workspace: WorkspaceMount::AtBoot,
            tsc_khz: Some(1_996_250),
            ..Default::default()
        };
        assert_eq!(
            p.to_cmdline(),
            "console=ttyS0 quiet panic=-1 reboot=t tsc=reliable no_timer_check cryptomgr.notests \
             tsc_early_khz=1996250 executor.images=2 executor.workspace=1"
        );
        let d = BootParams {
            images: 0,
            workspace: WorkspaceMount::None,
            debug: true,
            tsc_khz: None,
            net: Some(net()),
            nic: false,
            template: false,
        };
        assert_eq!(
            d.to_cmdline(),
            "console=ttyS0 panic=-1 reboot=t tsc=reliable no_timer_check cryptomgr.notests \
             executor.images=0 executor.workspace=0 executor.debug=1 \
             executor.net=10.255.0.2/30,10.255.0.1,198.51.100.53,192.0.2.53"
        );
        let pool = BootParams { images: 1, workspace: WorkspaceMount::OnRequest, ..Default::default() };
        assert!(pool.to_cmdline().ends_with("executor.workspace=2"));
        assert!(!pool.to_cmdline().contains(" -- "));
    }

    #[test]
    fn the_kernel_s_own_words_are_ignored_and_bad_values_refused() {
        let line = "BOOT_IMAGE=/vmlinuz console=ttyS0 ro executor.images=3 executor.workspace=2\n";
        let p = BootParams::parse(line).unwrap();
        assert_eq!((p.images, p.workspace, p.debug, p.net), (3, WorkspaceMount::OnRequest, false, None));
        assert_eq!(BootParams::parse("").unwrap(), BootParams::default());
        for bad in
            ["executor.images=x", "executor.workspace=3", "executor.net=10.0.0.1", "tsc_early_khz=fast"]
        {
            assert!(BootParams::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_network_value_parses() {
        let n = GuestNet::parse("10.255.0.2/30,10.255.0.1,198.51.100.53,192.0.2.53").unwrap();
        assert_eq!(n, net());
        assert_eq!(n.to_value(), "10.255.0.2/30,10.255.0.1,198.51.100.53,192.0.2.53");
        assert!(GuestNet::parse("10.255.0.2/30,10.255.0.1").unwrap().dns.is_empty());
        assert!(GuestNet::parse("10.255.0.2,10.255.0.1").is_err());
        assert!(GuestNet::parse("10.255.0.2/30").is_err());
        assert!(GuestNet::parse("10.255.0.2/33,10.255.0.1").is_err());
    }
}
