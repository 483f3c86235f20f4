//! Clap types of the microVM commands: `install vm` and `test-vm`.

use clap::{Args, Subcommand};
use std::path::PathBuf;

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
}

#[derive(Debug, Args)]
pub struct InstallVmArgs {
    /// State directory (vm/ is created below it)
    #[arg(long, env = "EXECUTOR_STATE_DIR", default_value = "/var/lib/executor")]
    pub state_dir: PathBuf,
    /// Kernel package: a linux-image-<version>-cloud-amd64 package or the metapackage naming one
    #[arg(long, default_value = crate::vm::DEFAULT_KERNEL_PACKAGE)]
    pub kernel_package: String,
    /// Rebuild even what is up to date
    #[arg(long)]
    pub force: bool,
}

/// Settings shared by commands that boot VMs.
#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed)
    #[arg(long, env = "EXECUTOR_VM_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Allow `--accel auto` to fall back to TCG software emulation (slow)
    #[arg(long, env = "EXECUTOR_VM_ALLOW_TCG", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub allow_tcg: bool,
}

#[derive(Debug, Args)]
pub struct TestVmArgs {
    /// State directory holding vm/ (see `executor install vm`)
    #[arg(long, env = "EXECUTOR_STATE_DIR", default_value = "/var/lib/executor")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Seconds the boot and the command may take together
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Print the phases as one JSON object on stdout instead of text on stderr
    #[arg(long)]
    pub json: bool,
    /// The command to run in the guest's initramfs (busybox applets are on PATH)
    #[arg(last = true, default_value = "uname -a")]
    pub command: Vec<String>,
}
