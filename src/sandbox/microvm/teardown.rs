//! The end of VMs: one VM's teardown, and the janitor's sweep of VMs no job owns (a QEMU is
//! killed only when its command line names it, so that a reused PID is never hit).

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs;
use std::time::{Duration, Instant};

use super::qemu::QEMU;
use super::{cgroup, jail, net, MicroVm, MARKER};
use crate::sandbox::SandboxRecord;

impl MicroVm {
    /// Kills a VM's QEMU and removes its cgroup, network and sandbox directory.
    pub(super) fn remove_vm(&self, sandbox: &SandboxRecord) -> Result<()> {
        if let Ok(det) = Self::details(sandbox) {
            drop(self.take_idle(sandbox, &det.socket));
        }
        if let Some(pid) = sandbox.pid {
            kill_vm(pid, &sandbox.name);
        }
        cgroup::Cgroup::remove(&sandbox.name);
        if let Some(n) = Self::details(sandbox).ok().and_then(|d| d.network) {
            net::teardown(&self.opts, &n)?;
        }
        // QEMU is gone: its uid may serve another VM.
        jail::release(&self.opts.state_dir, &sandbox.name)?;
        // Only a directory of ours: the record could have been altered.
        if sandbox.state_dir.join(MARKER).is_file()
            && sandbox.state_dir.starts_with(self.opts.sandboxes_dir())
        {
            fs::remove_dir_all(&sandbox.state_dir)
                .with_context(|| format!("removing {}", sandbox.state_dir.display()))?;
        }
        Ok(())
    }

    /// Removes the VMs named `<prefix>-...` of this state directory that no live job owns:
    /// their QEMU processes, sandbox directories, cgroups and networks.
    pub(super) fn sweep(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let want = format!("{prefix}-");
        if let Ok(procs) = fs::read_dir("/proc") {
            for e in procs.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
                let args: Vec<String> =
                    cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                if !args.first().is_some_and(|a| a.ends_with(QEMU)) {
                    continue;
                }
                if let Some(name) = args.windows(2).find(|w| w[0] == "-name").map(|w| w[1].clone()) {
                    // Only VMs of this state directory: QEMU processes are host-wide, and another
                    // executor's (or another state directory's) VMs are not ours to judge.
                    let ours = self.opts.sandboxes_dir().join(&name).exists();
                    if name.starts_with(&want) && !live.contains(&name) && ours {
                        kill_vm(pid, &name);
                        cgroup::Cgroup::remove(&name);
                        removed.push(name);
                    }
                }
            }
        }
        if let Ok(dirs) = fs::read_dir(self.opts.sandboxes_dir()) {
            for e in dirs.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&want) && !live.contains(&name) && e.path().join(MARKER).is_file() {
                    fs::remove_dir_all(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                    cgroup::Cgroup::remove(&name);
                    if !removed.contains(&name) {
                        removed.push(name);
                    }
                }
            }
        }
        // Networks of VMs that are gone (a TAP goes with its QEMU; the slot and element stay).
        let owned = |n: &str| n.starts_with(&want) && !live.contains(n);
        let dir = self.opts.sandboxes_dir();
        for name in jail::reclaim(&self.opts.state_dir, |n| owned(n) && !dir.join(n).exists())? {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        // Empty cgroups of VMs that are gone (a boot killed between its cgroup and its record).
        let keep = |n: &str| live.contains(n) || dir.join(n).exists();
        for name in cgroup::Cgroup::sweep_empty(&want, keep) {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        for name in crate::network::janitor(&self.opts.state_dir, owned)? {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Whether process `pid` is the QEMU of VM `name`.
pub(super) fn process_is(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
}

/// Whether `pid` is an exited QEMU that this process started and has not reaped: a zombie
/// (its command line is gone, its name stays) whose parent is this process. Its pid cannot be
/// another process's until it is reaped.
fn our_dead_qemu(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "pid (comm) state ppid ...": the name may hold spaces and parentheses; the last ')' ends it.
    let Some((head, rest)) = stat.rsplit_once(')') else { return false };
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
    let mut w = rest.split_whitespace();
    let (state, ppid) = (w.next(), w.next().and_then(|p| p.parse::<u32>().ok()));
    state == Some("Z") && ppid == Some(std::process::id()) && QEMU.starts_with(comm)
}

/// Kills the QEMU of VM `name`, reaps it when this process started it (the loop starts the
/// VMs of its pool and of its jobs: a zombie stays in its cgroup, which then cannot go), and
/// waits (up to 5 s) for it to be gone.
pub(super) fn kill_vm(pid: i32, name: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    let p = Pid::from_raw(pid);
    if !process_is(pid, name) {
        // Already exited by itself (a guest that powered off): reap it if it is ours.
        if our_dead_qemu(pid) {
            let _ = waitpid(p, Some(WaitPidFlag::WNOHANG));
        }
        return;
    }
    let _ = kill(p, Signal::SIGKILL);
    let start = Instant::now();
    let mut ours = true;
    while start.elapsed() < Duration::from_secs(5) {
        if ours {
            match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => return,
                // Not our child: its parent (init, for a VM of an ended stage) reaps it.
                Err(_) => ours = false,
            }
        }
        if !ours && !process_is(pid, name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
