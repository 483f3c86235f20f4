//! The microVM commands, `install vm` and `test-vm`: their clap types and what runs them. (The
//! guest agent is its own binary, `executor-guest-agent`.)

use clap::Args;
use std::path::PathBuf;

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
    /// Also build the guest's container engine (podman, from Debian's packages with debootstrap)
    /// that cliSteps jobs run `src batch exec` with
    #[arg(long)]
    pub engine: bool,
    /// The Debian mirror the engine's packages come from
    #[arg(long, value_name = "URL", default_value = crate::vm::engine::DEFAULT_MIRROR)]
    pub engine_mirror: String,
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
    /// Clone this repository from the coordinator into the VM's workspace (/data, where the
    /// command then runs), as a job's would be; needs EXECUTOR_FRONTEND_URL and the shared secret
    #[arg(long, value_name = "NAME", requires = "revision")]
    pub repo: Option<String>,
    /// The commit (or ref) of --repo to check out
    #[arg(long, value_name = "REV", requires = "repo")]
    pub revision: Option<String>,
    /// The coordinator serving --repo
    #[arg(long, env = "EXECUTOR_FRONTEND_URL", value_name = "URL")]
    pub frontend_url: Option<String>,
    /// PEM file of CA certificates trusted for an https coordinator
    #[arg(long, env = "EXECUTOR_FRONTEND_CA", value_name = "FILE")]
    pub frontend_ca: Option<PathBuf>,
    /// Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD
    #[arg(long, env = "EXECUTOR_FRONTEND_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The queue whose heartbeat route registers this executor before the clone
    #[arg(long = "queue", env = "EXECUTOR_QUEUE_NAME", value_name = "NAME", default_value = "batches")]
    pub queue: String,
    /// The command to run in the guest's initramfs (busybox applets are on PATH)
    #[arg(last = true, default_value = "uname -a")]
    pub command: Vec<String>,
}

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::time::Duration;

use crate::base::exit;
use crate::sandbox::microvm::{Accel, MicroVm};
use crate::sandbox::{OutputSink, RuntimeOptions, StepEnd, Stream};

/// The runtime options the VM flags describe.
pub(crate) fn runtime_options(state_dir: std::path::PathBuf, vm: &VmArgs) -> Result<RuntimeOptions> {
    let accel: Accel =
        vm.accel.parse().map_err(|e: anyhow::Error| exit::ExitError::new(exit::USAGE, e.to_string()))?;
    Ok(RuntimeOptions {
        state_dir,
        allow_unisolated: false,
        oci_runtime: "runc".into(),
        vm_accel: accel,
        vm_allow_tcg: vm.allow_tcg,
        network: crate::network::Settings::default(),
        keep_failed: false,
        vm_snapshots: true,
    })
}

pub(crate) fn install_vm(args: InstallVmArgs) -> Result<i32> {
    // The manifest records absolute paths: QEMU runs in the sandbox's directory.
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("resolving the state directory {}", args.state_dir.display()))?;
    let did = crate::vm::install(&crate::vm::InstallOptions {
        state_dir: state_dir.clone(),
        kernel_package: args.kernel_package,
        force: args.force,
    })?;
    for line in did {
        eprintln!("install vm: {line}");
    }
    if args.engine {
        for line in crate::vm::engine::install(&state_dir, &args.engine_mirror, args.force)? {
            eprintln!("install vm: {line}");
        }
    }
    Ok(exit::OK)
}

struct Passthrough;

impl OutputSink for Passthrough {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        // The guest's output goes to stderr: stdout is for the JSON summary only.
        let _ = stream;
        let _ = std::io::stderr().write_all(data);
    }
}

pub(crate) fn test_vm(args: TestVmArgs) -> Result<i32> {
    let opts = runtime_options(args.state_dir.clone(), &args.vm)?;
    let rt = MicroVm::new(opts);
    let argv = if args.command.len() == 1 {
        vec!["/bin/sh".to_string(), "-c".to_string(), args.command[0].clone()]
    } else {
        args.command.clone()
    };
    let workspace = match (&args.repo, &args.revision) {
        (Some(repo), Some(rev)) => Some(clone_for_test_vm(&args, repo, rev)?),
        _ => None,
    };
    let (phases, end, run, accel) = rt.test_vm(
        &argv,
        workspace.as_ref().map(|w| w.path()),
        &mut Passthrough,
        Duration::from_secs(args.timeout),
    )?;
    let code = match end {
        StepEnd::Exited(c) => c,
        StepEnd::Signaled(s) => 128 + s,
        StepEnd::Stopped(r) => bail!("the command was stopped: {r}"),
    };
    if args.json {
        let v = serde_json::json!({
            "accel": accel,
            "phases": phases,
            "commandMs": run.as_millis() as u64,
            "exitCode": code,
        });
        println!("{v}");
    } else {
        eprintln!("test-vm: accelerator {accel}");
        eprintln!("test-vm: disk build      {:>6} ms", phases.disk_build_ms);
        eprintln!("test-vm: qemu start      {:>6} ms", phases.qemu_start_ms);
        eprintln!("test-vm: kernel boot     {:>6} ms (guest clock)", phases.kernel_boot_ms);
        eprintln!("test-vm: agent ready     {:>6} ms (guest clock)", phases.agent_ready_ms);
        eprintln!("test-vm: boot total      {:>6} ms", phases.total_ms);
        eprintln!("test-vm: command         {:>6} ms, exit {code}", run.as_millis());
    }
    Ok(if code == 0 { exit::OK } else { exit::JOB_FAILED })
}

/// Clones `repo` at `rev` from the coordinator into a fresh workspace, authenticated as the
/// contract's fallback for callers without a job token: the shared secret, from an executor
/// that heartbeated first (Sourcegraph's `test-vm` does the same).
fn clone_for_test_vm(args: &TestVmArgs, repo: &str, rev: &str) -> Result<tempfile::TempDir> {
    let url = args
        .frontend_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .context("--repo needs the coordinator: set EXECUTOR_FRONTEND_URL (--frontend-url)")?
        .trim_end_matches('/');
    let secret = crate::config::load_password(args.password_file.as_deref())?;
    let name = crate::api::new_executor_name();
    let client = crate::api::Client::new(args.frontend_ca.as_deref(), &secret, url, &name)?;
    client
        .ping(std::slice::from_ref(&args.queue), false)
        .map_err(|e| anyhow::anyhow!("registering with the coordinator at {url}: {e}"))?;
    let dir = args.state_dir.join("workspaces");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ws = tempfile::Builder::new()
        .prefix("test-vm-")
        .tempdir_in(&dir)
        .with_context(|| format!("creating a workspace in {}", dir.display()))?;
    let job = crate::protocol::Job {
        repository_name: repo.to_string(),
        commit: rev.to_string(),
        ..Default::default()
    };
    let redactor = crate::base::redact::Redactor::for_job(secret.expose(), &Default::default());
    let logger = crate::logs::JobLogger::new(std::sync::Arc::new(StderrLogs), redactor, true);
    let cx = crate::workspace::CloneContext {
        frontend_url: url,
        executor_name: &name,
        secret: Some(&secret),
        ca_file: args.frontend_ca.as_deref(),
        cache_dir: None,
        max_bytes: 0,
        git_timeout: Duration::from_secs(600),
        cancel: None,
    };
    crate::workspace::clone_repository(&job, ws.path(), &logger, &cx)
        .with_context(|| format!("cloning {repo} at {rev}"))?;
    eprintln!("test-vm: cloned {repo} at {rev}");
    Ok(ws)
}

/// Prints the clone's log entries on stderr as they arrive (the logger sends deltas here).
struct StderrLogs;

impl crate::logs::LogTransport for StderrLogs {
    fn add(&self, entry: &crate::protocol::ExecutionLogEntry) -> Result<i64, crate::api::ApiError> {
        let command = entry.command.as_ref().map(|c| c.join(" ")).unwrap_or_default();
        eprintln!("test-vm: {} {command}", entry.key);
        Ok(1)
    }
    fn update(
        &self,
        _id: i64,
        entry: &crate::protocol::ExecutionLogEntry,
        _append: bool,
    ) -> Result<(), crate::api::ApiError> {
        if let Some(out) = &entry.out {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(out.as_bytes());
        }
        Ok(())
    }
}
