//! The only place for unsafe code: hooks that run in a child process between fork and exec, and
//! the new mount API syscalls (open_tree, mount_setattr, move_mount) for idmapped mounts, and
//! openat2 for resolving paths beneath a directory without following symlinks.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Makes `cmd` start in a private mount namespace where the hybrid layout's cgroup v2 mount
/// (`/sys/fs/cgroup/unified`) is detached, so that crun treats the host as plain cgroup v1.
/// The host's own mount table is untouched.
pub(crate) fn hide_unified_cgroup(cmd: &mut Command) {
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

/// Makes `cmd` start in a private mount namespace where `/proc/sys/net` is covered by an empty
/// read-only tmpfs. For gVisor's runsc of 2022-12, which takes a network namespace for the
/// host's when `/proc/sys/net/core/rmem_default` exists, as it does in every namespace of a
/// newer kernel, and then refuses to network a sandbox at all. The tmpfs holds a second, fully
/// visible procfs (`/proc/sys/net/proc`): without one, the kernel refuses runsc's gofer, in its
/// own user namespace, a procfs of its own while part of `/proc` is covered. The host's mount
/// table is untouched.
pub(crate) fn hide_net_sysctls(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (unshare, mount, mkdir) through nix on short static strings, which nix passes on the
    // stack: no allocation, no lock.
    unsafe {
        cmd.pre_exec(|| {
            use nix::mount::{mount, MsFlags};
            let none = None::<&str>;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
            let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            mount(Some("tmpfs"), "/proc/sys/net", Some("tmpfs"), hardened, Some("size=4k,mode=755"))?;
            nix::unistd::mkdir("/proc/sys/net/proc", nix::sys::stat::Mode::from_bits_truncate(0o555))?;
            mount(Some("proc"), "/proc/sys/net/proc", Some("proc"), hardened, none)?;
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardened;
            mount(none, "/proc/sys/net", none, ro, none)?;
            Ok(())
        });
    }
}

/// Makes `cmd` start inside `root` (chroot), in `cwd` there, as the leader of a new session: how
/// the microVM guest agent starts a step, without a helper process of its own.
pub(crate) fn enter_root(cmd: &mut Command, root: &Path, cwd: &str) -> std::io::Result<()> {
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

/// The size (rows, columns) of the terminal open as `fd`, if it is one.
pub(crate) fn window_size(fd: i32) -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given, which lives here.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Makes standard input the controlling terminal of `cmd` (a terminal's far end), after the
/// hooks registered before this one ran ([`enter_root`]'s `setsid`).
pub(crate) fn controlling_terminal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and makes one ioctl on fd 0: no
    // allocation, no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd` drop to `uid`, `gid` and the supplementary `groups` after the hooks registered
/// before this one ran ([`enter_root`]'s chroot needs root): std's own `uid`/`gid` would switch
/// before them.
pub(crate) fn switch_user(cmd: &mut Command, uid: u32, gid: u32, groups: &[u32]) {
    let groups: Vec<nix::unistd::Gid> = groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    // SAFETY: the closure runs in the forked child before exec and only makes the setgroups,
    // setgid and setuid syscalls through nix on values built before the fork: no allocation, no
    // lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            Ok(())
        });
    }
}

/// Makes `cmd` start in the directory open as `dir` (fchdir: it needs no search permission on
/// the directories above, which may be closed to the user the command runs as) and inherit the
/// descriptors `keep` across exec (they are open with close-on-exec until then).
pub(crate) fn start_in_dir_keeping(cmd: &mut Command, dir: RawFd, keep: Vec<RawFd>) {
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

/// One step of building a jail's root ([`jail`]), every path absolute in the host's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JailOp {
    /// A tmpfs (small, `mode=755`) mounted on an existing directory.
    Tmpfs(std::path::PathBuf),
    Mkdir(std::path::PathBuf),
    /// An empty file, to bind a file or a device node over.
    Touch(std::path::PathBuf),
    /// `at` is a symbolic link to `target`.
    Symlink {
        target: std::path::PathBuf,
        at: std::path::PathBuf,
    },
    /// `src` bound on `dst`, then made read-only (and nosuid) unless `writable`; `nodev` and
    /// `noexec` too unless it is a device node.
    Bind {
        src: std::path::PathBuf,
        dst: std::path::PathBuf,
        writable: bool,
        device: bool,
    },
    /// A procfs of its own with `hidepid=2` (a process sees only its user's processes).
    Proc(std::path::PathBuf),
}

/// What [`jail`] does: `ops` build the new root at `root` (an empty directory, covered by the
/// first op's tmpfs), which then becomes `/`, read-only; the process starts in `cwd` there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JailPlan {
    pub root: std::path::PathBuf,
    pub ops: Vec<JailOp>,
    pub cwd: std::path::PathBuf,
}

/// Makes `cmd` start jailed as Firecracker's jailer starts Firecracker, for QEMU: in new mount,
/// network, IPC and UTS namespaces, its root the tmpfs `plan` builds (nothing of the host's
/// filesystem but what the plan binds), with `no_new_privs`, then as `uid`/`gid` with no
/// supplementary groups. Register it after any hook that uses a descriptor of the host's tree
/// ([`start_in_dir_keeping`]): the plan's `cwd` replaces the working directory.
pub(crate) fn jail(cmd: &mut Command, plan: &JailPlan, uid: u32, gid: u32) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes());
    enum Op {
        Tmpfs(CString),
        Mkdir(CString),
        Touch(CString),
        Symlink(CString, CString),
        Bind(CString, CString, bool, bool),
        Proc(CString),
    }
    let mut ops = Vec::with_capacity(plan.ops.len());
    for op in &plan.ops {
        ops.push(match op {
            JailOp::Tmpfs(p) => Op::Tmpfs(c(p)?),
            JailOp::Mkdir(p) => Op::Mkdir(c(p)?),
            JailOp::Touch(p) => Op::Touch(c(p)?),
            JailOp::Symlink { target, at } => Op::Symlink(c(target)?, c(at)?),
            JailOp::Bind { src, dst, writable, device } => Op::Bind(c(src)?, c(dst)?, *writable, *device),
            JailOp::Proc(p) => Op::Proc(c(p)?),
        });
    }
    let root = c(&plan.root)?;
    let cwd = c(&plan.cwd)?;
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (unshare, mount, mkdir, open, symlink, pivot_root, umount2, chdir, prctl, setgroups,
    // setgid, setuid) through nix on C strings built before the fork, which nix passes as they
    // are: no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            use nix::mount::{mount, umount2, MntFlags, MsFlags};
            use nix::sched::CloneFlags;
            use nix::sys::stat::Mode;
            let none = None::<&CStr>;
            nix::sched::unshare(
                CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWNET
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWUTS,
            )?;
            mount(none, c"/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
            let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            for op in &ops {
                match op {
                    Op::Tmpfs(p) => mount(
                        Some(c"tmpfs"),
                        p.as_c_str(),
                        Some(c"tmpfs"),
                        MsFlags::MS_NOSUID,
                        Some(c"size=64k,mode=755"),
                    )?,
                    Op::Mkdir(p) => nix::unistd::mkdir(p.as_c_str(), Mode::from_bits_truncate(0o755))?,
                    Op::Touch(p) => {
                        let fd = nix::fcntl::open(
                            p.as_c_str(),
                            nix::fcntl::OFlag::O_CREAT
                                | nix::fcntl::OFlag::O_WRONLY
                                | nix::fcntl::OFlag::O_CLOEXEC,
                            Mode::from_bits_truncate(0o644),
                        )?;
                        nix::unistd::close(fd)?;
                    }
                    Op::Symlink(target, at) => {
                        nix::unistd::symlinkat(target.as_c_str(), None, at.as_c_str())?
                    }
                    Op::Bind(src, dst, writable, device) => {
                        mount(
                            Some(src.as_c_str()),
                            dst.as_c_str(),
                            none,
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            none,
                        )?;
                        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
                        if !*writable {
                            flags |= MsFlags::MS_RDONLY;
                        }
                        if !*device {
                            flags |= MsFlags::MS_NODEV;
                        }
                        mount(none, dst.as_c_str(), none, flags, none)?;
                    }
                    Op::Proc(p) => {
                        mount(Some(c"proc"), p.as_c_str(), Some(c"proc"), hardened, Some(c"hidepid=2"))?
                    }
                }
            }
            nix::unistd::chdir(root.as_c_str())?;
            nix::unistd::pivot_root(c".", c".")?;
            umount2(c".", MntFlags::MNT_DETACH)?;
            nix::unistd::chdir(c"/")?;
            mount(
                none,
                c"/",
                none,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
                none,
            )?;
            nix::unistd::chdir(cwd.as_c_str())?;
            nix::sys::prctl::set_no_new_privs()?;
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` start with `no_new_privs`: nothing it executes gains privileges (setuid bits,
/// file capabilities).
pub(crate) fn no_new_privs(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl
    // syscall through nix: no allocation, no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
}

/// A user namespace whose uid and gid maps are both `inner outer count`, held by an fd: what an
/// idmapped mount ([`idmapped_bind`]) takes. A short-lived child unshares it; the namespace
/// lives on through the fd after the child is gone.
pub(crate) fn userns_fd(inner: u32, outer: u32, count: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut cmd = crate::base::proc::command("sleep");
    cmd.arg("30")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked (single-threaded) child before exec and only makes
    // the unshare syscall through nix, which neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)?;
            Ok(())
        });
    }
    // `spawn` returns once the child has exec'd, so its namespace exists by then.
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let res = (|| {
        let line = format!("{inner} {outer} {count}\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &line)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &line)?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(std::os::fd::OwnedFd::from(f))
    })();
    let _ = child.kill();
    let _ = child.wait();
    res
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x10_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Bind-mounts `src` on `dst` read-only, nosuid, nodev and idmapped through `userns` (files
/// owned by `inner + n` on disk appear owned by `outer + n`), with open_tree, mount_setattr and
/// move_mount (Linux 5.12+).
pub(crate) fn idmapped_bind(
    src: &std::path::Path,
    dst: &std::path::Path,
    userns: &std::os::fd::OwnedFd,
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let src = std::ffi::CString::new(src.as_os_str().as_bytes())?;
    let dst = std::ffi::CString::new(dst.as_os_str().as_bytes())?;
    let empty = c"";
    // SAFETY: open_tree reads the NUL-terminated path `src`, which outlives the call; it returns
    // a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open_tree and is owned by nothing else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr reads `attr` (of the size passed) and the empty path, both live for
    // the call; `tree` is an open detached mount.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: move_mount reads the two NUL-terminated paths, which live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens `rel` below the directory open as `dir` with openat2(2): the resolution never leaves
/// `dir` (no `..` above it, no absolute path) and follows no symlink on the way (ELOOP or EXDEV
/// instead); a trailing symlink is returned as itself only with `O_PATH | O_NOFOLLOW`. `flags`
/// always get `O_CLOEXEC`.
pub(crate) fn open_beneath(
    dir: std::os::fd::BorrowedFd<'_>,
    rel: &Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let rel = CString::new(rel.as_os_str().as_bytes())?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u32 as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 { u64::from(mode) } else { 0 },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size passed), both live
    // for the call; `dir` is a descriptor borrowed for the call. It returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat2 and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Drops the kernel's cached blocks of the block device open as `dev` (`BLKFLSBUF`): the microVM
/// guest agent does this before mounting a workspace disk the host wrote after the guest had
/// already probed it, so that no block read at probe time is taken for the new filesystem.
pub(crate) fn flush_block_buffers(dev: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // BLKFLSBUF is _IO(0x12, 97).
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument and only reads the descriptor, which `dev` keeps open
    // for the duration of the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF as _, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `seed` into the kernel's entropy pool of `/dev/urandom` open as `dev`, credited
/// (`RNDADDENTROPY`), then has the kernel reseed its CRNG at once (`RNDRESEEDCRNG`): the microVM
/// guest agent does this in a VM restored from a snapshot, whose RNG state is the snapshot's,
/// so that two VMs of one snapshot never hand out the same random stream. Needs CAP_SYS_ADMIN.
pub(crate) fn reseed_kernel_rng(dev: &std::fs::File, seed: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // RNDADDENTROPY is _IOW('R', 0x03, int[2]); RNDRESEEDCRNG is _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    if seed.is_empty() || seed.len() > 512 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a seed has 1 to 512 bytes"));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its header and stays alive
    // for the call; the kernel only reads it. `dev` keeps the descriptor open.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the TAP device `name` (no packet-info header, virtio-net headers) in the calling
/// thread's network namespace and returns its descriptor: the device lives as long as a
/// descriptor of it is open (QEMU's, once handed over).
pub(crate) fn open_tap(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    const IFF_VNET_HDR: i16 = 0x4000;
    if name.is_empty() || name.len() > 15 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a TAP name has 1 to 15 bytes"));
    }
    let f: OwnedFd = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?.into();
    // struct ifreq: the name (16 bytes, NUL-terminated), then the flags (a short) in a union
    // of 24 bytes.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on Linux), which `ifr` is,
    // and `f` is an open descriptor of /dev/net/tun that outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// `struct loop_info64` of the loop driver (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of LOOP_CONFIGURE (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Attaches the image file `image` (open read-write) to a free loop device, which goes away by
/// itself once nothing holds it (`LO_FLAGS_AUTOCLEAR`): the caller mounts it and drops the
/// returned fd. What `mount -o loop` does, without starting a process.
pub(crate) fn loop_attach(image: &std::fs::File) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::fd::AsRawFd;
    let control = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    // Another process may take the free device between the two calls: try again then.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: LoopConfig is plain data for which all zeroes is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = image.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config` through the pointer, which
        // points at a live, properly laid out value for the duration of the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((path, dev));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(std::io::Error::other("no free loop device after 16 tries"))
}

/// The value of the extended attribute `name` of `path` itself (never a symlink's target), into
/// `buf`: its length, or `None` when it has none or it cannot be read.
pub(crate) fn lgetxattr(path: &std::ffi::CStr, name: &std::ffi::CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: both strings are NUL-terminated and live across the call; the kernel writes at
    // most `buf.len()` bytes into `buf`, which is valid and exclusively borrowed.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).ok()
}

/// Hands the allocator's free pages back to the kernel. glibc keeps freed memory in the arena of
/// the thread that used it, so each job thread's arena would otherwise hold the peak of the
/// largest job it ever ran (a 20 MB log, a big batch result) for the life of the process.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
