//! The only place for unsafe code: hooks that run in a child process between fork and exec.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Makes `cmd` start in a private mount namespace where the hybrid layout's cgroup v2 mount
/// (`/sys/fs/cgroup/unified`) is detached, so that crun treats the host as plain cgroup v1.
/// The host's own mount table is untouched.
pub fn hide_unified_cgroup(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (unshare, mount, umount2) through nix, which neither allocate nor take locks.
    unsafe {
        cmd.pre_exec(|| {
            use nix::mount::{mount, umount2, MntFlags, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
            umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH)?;
            Ok(())
        });
    }
}

/// Makes `cmd` start inside `root` (chroot), in `cwd` there, as the leader of a new session: how
/// the microVM guest agent starts a step, without a helper process of its own.
pub fn enter_root(cmd: &mut Command, root: &Path, cwd: &str) -> std::io::Result<()> {
    let root = CString::new(root.as_os_str().as_bytes())?;
    let cwd = CString::new(cwd)?;
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (chroot, chdir, setsid) through nix on C strings built before the fork: no allocation, no
    // lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(root.as_c_str())?;
            nix::unistd::chdir(cwd.as_c_str())?;
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` start in the directory open as `dir` (fchdir: it needs no search permission on
/// the directories above, which may be closed to the user the command runs as) and inherit the
/// descriptors `keep` across exec (they are open with close-on-exec until then).
pub fn start_in_dir_keeping(cmd: &mut Command, dir: RawFd, keep: Vec<RawFd>) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (fchdir, fcntl) through nix on descriptors the parent holds open; iterating the vector
    // moved in does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::fchdir(dir)?;
            for fd in &keep {
                nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            }
            Ok(())
        });
    }
}
