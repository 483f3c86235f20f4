//! The microVM commands: `install vm` and `test-vm`, from their clap arguments to the modules that
//! do the work. (The guest agent is its own binary, `executor-guest-agent`.)

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::time::Duration;

use crate::cli::vm::{InstallVmArgs, TestVmArgs, VmArgs};
use crate::exit;
use crate::sandbox::microvm::{Accel, MicroVm};
use crate::sandbox::{OutputSink, RuntimeOptions, StepEnd, Stream};

/// The runtime options the VM flags describe.
pub fn runtime_options(state_dir: std::path::PathBuf, vm: &VmArgs) -> Result<RuntimeOptions> {
    let accel: Accel =
        vm.accel.parse().map_err(|e: anyhow::Error| exit::ExitError::new(exit::USAGE, e.to_string()))?;
    Ok(RuntimeOptions {
        state_dir,
        allow_unisolated: false,
        oci_runtime: "runc".into(),
        vm_accel: accel,
        vm_allow_tcg: vm.allow_tcg,
    })
}

pub fn install_vm(args: InstallVmArgs) -> Result<i32> {
    // The manifest records absolute paths: QEMU runs in the sandbox's directory.
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("resolving the state directory {}", args.state_dir.display()))?;
    let did = crate::vm::install(&crate::vm::InstallOptions {
        state_dir,
        kernel_package: args.kernel_package,
        force: args.force,
    })?;
    for line in did {
        eprintln!("install vm: {line}");
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

pub fn test_vm(args: TestVmArgs) -> Result<i32> {
    let opts = runtime_options(args.state_dir, &args.vm)?;
    let rt = MicroVm::new(opts);
    let argv = if args.command.len() == 1 {
        vec!["/bin/sh".to_string(), "-c".to_string(), args.command[0].clone()]
    } else {
        args.command.clone()
    };
    let (phases, end, run, accel) = rt.test_vm(&argv, &mut Passthrough, Duration::from_secs(args.timeout))?;
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
