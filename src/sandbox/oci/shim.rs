//! A step container made ahead of its step: the executor's binary started as `executor-oci-shim`
//! (by the oci runtime only, so no subcommand names it) runs `<runtime> create` at once, so that the runtime's own start-up, the namespaces,
//! the mounts and the seccomp filter are done while the job's repository is still cloning, and
//! `<runtime> start` when told to, leaving only the exec of the step's process on the path to its
//! first output (runc: 36-46 ms for `create`, 6-10 ms for `start`).
//!
//! Why a process of its own: after `create` the container's first process is nobody's child (its
//! `runc` has exited), and only a parent learns how a process ended. The shim is a child
//! subreaper, so the container's process becomes its child, and it exits with what `runc run`
//! would have: the process's exit code, or 128 + the signal that killed it.
//!
//! The protocol, on the shim's standard input (the container's is /dev/null): one byte `G`
//! starts the step; end of input (the executor dropped the step, or died) deletes the container
//! unstarted. The shim's standard output and error are the step's: the runtime passes them to the
//! container, and its errors land there as those of `runc run` do.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;

/// The name (`argv[0]`) the executor's binary is started under to be the shim.
pub(crate) const ARG0: &str = "executor-oci-shim";

/// The byte that starts a prepared step.
pub(crate) const GO: u8 = b'G';

/// The exit code of a shim whose container never ran (create or start failed, or it was dropped).
pub(crate) const NOT_RUN: i32 = 125;

/// The shim's arguments after `argv[0]`: `<bundle> <id> <runtime> [<runtime's global flags>…]`,
/// as [`command`] writes them.
pub(crate) fn main_with_args(mut args: impl Iterator<Item = std::ffi::OsString>) -> i32 {
    // The shim's stderr is the step's own: its lines reach the step's log, named as before.
    crate::base::log::init_plain(ARG0);
    let (Some(bundle), Some(id)) = (args.next(), args.next()) else {
        tracing::error!("started without its bundle and container id");
        return NOT_RUN;
    };
    let runtime: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    main(&runtime, Path::new(&bundle), &id.to_string_lossy())
}

/// The shim's command for container `id` of `bundle`, made by `runtime` (program and global flags).
pub(crate) fn command(
    exe: &Path,
    bundle: &Path,
    id: &str,
    runtime: &[std::ffi::OsString],
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = crate::base::proc::command(exe);
    cmd.arg0(ARG0).arg(bundle).arg(id).args(runtime);
    cmd
}

/// Runs the shim: `runtime` is the runtime's program and global flags (`runc --root …`).
pub(crate) fn main(runtime: &[String], bundle: &Path, id: &str) -> i32 {
    let Some((program, global)) = runtime.split_first() else {
        tracing::error!("no runtime given");
        return NOT_RUN;
    };
    let run = |args: &[&str]| {
        let mut cmd = crate::base::proc::command(program);
        cmd.args(global).args(args).stdin(Stdio::null());
        cmd.status()
    };
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::error!("cannot become a subreaper: {e}");
        return NOT_RUN;
    }
    let pid_file = bundle.join("init.pid");
    let bundle_arg = bundle.to_string_lossy();
    let pid_arg = pid_file.to_string_lossy();
    match run(&["create", "--bundle", &bundle_arg, "--pid-file", &pid_arg, id]) {
        Ok(st) if st.success() => {}
        Ok(st) => {
            tracing::error!("{program} create failed ({st})");
            return NOT_RUN;
        }
        Err(e) => {
            tracing::error!("cannot run {program}: {e}");
            return NOT_RUN;
        }
    }
    let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok());
    let Some(pid) = pid.filter(|&pid| told(pid)) else {
        let _ = run(&["delete", "--force", id]);
        return NOT_RUN;
    };
    match run(&["start", id]) {
        Ok(st) if st.success() => {}
        other => {
            tracing::error!("{program} start failed ({other:?})");
            let _ = run(&["delete", "--force", id]);
            return NOT_RUN;
        }
    }
    wait_for(pid)
}

/// Waits for the byte that starts the step; false when the input ends first, or when the
/// container's waiting process `pid` dies first (its cgroup was killed): the shim then exits at
/// once, and the executor, seeing it gone, runs the step as usual.
fn told(pid: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    loop {
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => {
                let mut go = [0u8; 1];
                return matches!(stdin.lock().read(&mut go), Ok(1) if go[0] == GO);
            }
            Err(_) => return false,
        }
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            _ => return false,
        }
    }
}

/// Reaps children (the container's process, and any orphan handed to the subreaper) until `pid`
/// ends; returns its exit code, or 128 + the signal that killed it.
fn wait_for(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return code,
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => return 128 + sig as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("lost the step's process {pid}: {e}");
                return NOT_RUN;
            }
        }
    }
}
