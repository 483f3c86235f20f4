//! `executor install all|image|iptables-rules|ignite|cni`: Sourcegraph's install commands, each
//! doing this executor's equivalent or saying what replaces it and exiting 0, so that an
//! operator's provisioning scripts written for Sourcegraph's binary keep working.

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};

use super::executor::ConfigArgs;
use super::vm::InstallVmArgs;
use crate::base::exit;

/// What `executor install` installs.
#[derive(Debug, Subcommand)]
pub enum InstallCommand {
    /// Fetch the guest kernel from Debian's packages and build the initramfs with the guest agent
    ///
    /// Downloads a linux-image-*-cloud-amd64 package with `apt-get download`, unpacks it with
    /// `dpkg -x`, extracts an uncompressed vmlinux and the virtio modules, and builds an initramfs
    /// holding this binary as the guest agent. Files go to $EXECUTOR_STATE_DIR/vm. Running it again
    /// redoes only what is out of date, and says what it did.
    Vm(InstallVmArgs),
    /// Fetch Sourcegraph's src-cli from the instance for the guests of cliSteps jobs
    ///
    /// Downloads <EXECUTOR_FRONTEND_URL>/.api/src-cli/src_linux_amd64, checks it against the
    /// instance's .sha256 when it offers one (a mismatch installs nothing), or takes --from FILE;
    /// installs it under $EXECUTOR_STATE_DIR/vm/src-cli with a small disk that cliSteps VMs attach.
    SrcCli(super::src_cli::InstallSrcCliArgs),
    /// Everything this host needs, as Sourcegraph's `install all`: the microVM guest
    /// (`install vm`), the network's nftables table (`install iptables-rules`) and src-cli from
    /// the instance (`install src-cli`, when EXECUTOR_FRONTEND_URL is set)
    All(InstallAllArgs),
    /// Sourcegraph's VM images: `executor-vm` and `kernel` are the microVM guest (`install vm`);
    /// `sandbox` has no equivalent to install
    Image(InstallImageArgs),
    /// The jobs' network isolation: this executor's nftables table (Sourcegraph's iptables rules)
    IptablesRules(InstallRulesArgs),
    /// Sourcegraph's Firecracker manager: not used here (QEMU microVMs); says what replaces it
    Ignite(ReplacedArgs),
    /// Sourcegraph's CNI plugins: not used here (the executor makes each job's network itself)
    Cni(ReplacedArgs),
}

#[derive(Debug, Args)]
pub struct InstallAllArgs {
    /// Kernel package of the microVM guest (as `install vm --kernel-package`)
    #[arg(long, default_value = crate::vm::DEFAULT_KERNEL_PACKAGE)]
    pub kernel_package: String,
    /// Rebuild the guest even when it is up to date
    #[arg(long)]
    pub force: bool,
    /// Also build the guest's container engine for cliSteps jobs (as `install vm --engine`)
    #[arg(long)]
    pub engine: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Sourcegraph's three VM images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmImage {
    /// The Firecracker VM's root filesystem: here, the microVM guest's initramfs
    ExecutorVm,
    /// ignite's sandbox container: nothing here (QEMU runs in the job's own jail)
    Sandbox,
    /// The guest kernel
    Kernel,
}

#[derive(Debug, Args)]
pub struct InstallImageArgs {
    /// Which image (Sourcegraph's names)
    #[arg(value_enum)]
    pub image: VmImage,
    #[command(flatten)]
    pub vm: InstallVmArgs,
}

#[derive(Debug, Args)]
pub struct InstallRulesArgs {
    /// Accepted as Sourcegraph's flag; the table is made again whenever its layout is not this
    /// executor's, so there is nothing more to recreate
    #[arg(long)]
    pub recreate_chain: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct ReplacedArgs {
    /// Accepted as Sourcegraph's flag; nothing is installed
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<std::path::PathBuf>,
}

/// What replaces ignite (Sourcegraph's Firecracker manager).
pub(crate) const IGNITE_REPLACED: &str = "ignite is not used: the microvm runtime boots QEMU microVMs \
     itself (KVM where it works); `executor install vm` installs the guest kernel and initramfs";

/// What replaces the CNI plugins.
pub(crate) const CNI_REPLACED: &str = "the CNI plugins are not used: the executor makes each job's \
     network namespace, link and nftables rules itself (EXECUTOR_NETWORK); `executor install \
     iptables-rules` makes the table ahead";

/// What replaces ignite's sandbox image.
pub(crate) const SANDBOX_REPLACED: &str = "the sandbox image is not used: each QEMU process runs in \
     the job's own jail, with nothing to pull";

/// An install command.
pub(crate) fn run(cmd: InstallCommand) -> Result<i32> {
    match cmd {
        InstallCommand::Vm(args) => super::vm::install_vm(args),
        InstallCommand::SrcCli(args) => super::src_cli::install_src_cli(args),
        InstallCommand::All(args) => install_all(args),
        InstallCommand::Image(args) => match args.image {
            VmImage::ExecutorVm | VmImage::Kernel => {
                eprintln!("install image: the microVM guest (kernel and initramfs) replaces the VM images");
                super::vm::install_vm(args.vm)
            }
            VmImage::Sandbox => replaced("image sandbox", SANDBOX_REPLACED),
        },
        InstallCommand::IptablesRules(args) => {
            let net = crate::config::Settings::network_only(&args.config.raw)?;
            eprintln!("install iptables-rules: {}", crate::network::install_table(&net)?);
            Ok(exit::OK)
        }
        InstallCommand::Ignite(_) => replaced("ignite", IGNITE_REPLACED),
        InstallCommand::Cni(_) => replaced("cni", CNI_REPLACED),
    }
}

fn replaced(what: &str, why: &str) -> Result<i32> {
    eprintln!("install {what}: nothing to do: {why}");
    Ok(exit::OK)
}

/// Sourcegraph's `install all` (ignite, cni, src-cli, iptables rules, the images), in this
/// executor's terms: what replaces ignite, the CNI plugins and the sandbox image is said; the
/// guest and the network table are installed. An install command added later joins this list.
fn install_all(args: InstallAllArgs) -> Result<i32> {
    replaced("ignite", IGNITE_REPLACED)?;
    replaced("cni", CNI_REPLACED)?;
    let net = crate::config::Settings::network_only(&args.config.raw)?;
    eprintln!("install iptables-rules: {}", crate::network::install_table(&net)?);
    let values = crate::config::Values::parse(&args.config.raw)?;
    super::vm::install_vm(InstallVmArgs {
        state_dir: values.state_dir.clone(),
        kernel_package: args.kernel_package,
        force: args.force,
        engine: args.engine,
        engine_mirror: crate::vm::engine::DEFAULT_MIRROR.to_string(),
    })?;
    match values.frontend_url.clone() {
        Some(url) => {
            super::src_cli::install_src_cli(super::src_cli::InstallSrcCliArgs {
                state_dir: values.state_dir.clone(),
                frontend_url: Some(url),
                frontend_ca: values.frontend_ca.clone(),
                from: None,
            })?;
        }
        None => eprintln!(
            "install src-cli: skipped: EXECUTOR_FRONTEND_URL is not set (cliSteps jobs need src: \
             `executor install src-cli --from FILE`)"
        ),
    }
    replaced("image sandbox", SANDBOX_REPLACED)
}
