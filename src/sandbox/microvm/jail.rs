//! QEMU's jail, as Firecracker's jailer makes one for Firecracker: each VM's QEMU runs as a uid of
//! its own (the first id of a uid range taken from the same allocator as the oci runtime's,
//! `uid-ranges/` in the state directory), in new mount, network, IPC and UTS namespaces, its root
//! a read-only tmpfs that holds the system's program directories read-only, four device nodes
//! (`/dev/kvm` too under KVM), a procfs of its own (`hidepid=2`) and its sandbox directory at
//! `/vm`, nothing else of the host (no other VM's directory, no state directory, no agent
//! socket but its own), with `no_new_privs`, and QEMU's own seccomp filter ([`SANDBOX`]). Its
//! network namespace is empty: the job's TAP stays in the host's namespace behind the job's
//! nftables policy and reaches QEMU as an open descriptor, so QEMU's own sockets reach nothing.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use super::Accel;
use crate::base::sys::{JailOp, JailPlan};
use crate::sandbox::oci::uids;

/// QEMU's `-sandbox` argument: its seccomp filter, with every optional class denied.
pub(crate) const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Where the sandbox directory appears in the jail (QEMU's working directory).
pub(crate) const VM_DIR: &str = "/vm";

/// The account one VM's QEMU runs as.
pub(super) struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether QEMU starts jailed (the executor is root), or only with `no_new_privs` and its
    /// seccomp filter (an unprivileged executor: QEMU runs as the executor's own user).
    pub jailed: bool,
}

/// The user of VM `name`'s QEMU: none when the executor is not root; otherwise the first id of a
/// uid range of its own (taken here, given back by the VM's teardown or the janitor). Under
/// KVM its group is `kvm` where that group exists, for /dev/kvm.
pub(super) fn qemu_user(state_dir: &Path, name: &str, accel: Accel) -> Result<Option<QemuUser>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let slot = uids::UidRanges::new(state_dir)
        .allocate(name)
        .with_context(|| format!("taking a uid range for the QEMU of VM {name}"))?;
    let uid = uids::base(slot);
    let mut gid = uid;
    if accel == Accel::Kvm {
        if let Ok(Some(g)) = nix::unistd::Group::from_name("kvm") {
            gid = g.gid.as_raw();
        }
    }
    Ok(Some(QemuUser { name: format!("uid {uid}"), uid, gid, jailed: true }))
}

/// Gives back the uid range of VM `name`.
pub(super) fn release(state_dir: &Path, name: &str) -> Result<()> {
    uids::UidRanges::new(state_dir).release(name)
}

/// Gives back the uid ranges of VMs that `gone` says no longer exist; returns their names.
pub(super) fn reclaim(state_dir: &Path, gone: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    uids::UidRanges::new(state_dir).reclaim(gone)
}

/// The empty directory every jail's root tmpfs is mounted on (in the jail's own mount namespace;
/// the host never sees a mount there).
pub(super) fn root_dir(state_dir: &Path) -> Result<PathBuf> {
    let root = crate::vm::vm_dir(state_dir).join("jail");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(root)
}

/// The host's top-level program directories a dynamically linked QEMU needs: bound read-only,
/// or made again as the same symbolic link (merged /usr).
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// The jail of one VM whose sandbox directory is `dir` (an absolute path in a directory of
/// root's, so that QEMU's user cannot put anything else there; a descriptor would not do: the
/// kernel binds nothing of another mount namespace, and the child's is new).
pub(super) fn plan(root: &Path, dir: &Path, accel: Accel) -> JailPlan {
    let host = Path::new("/");
    let mut ops = vec![JailOp::Tmpfs(root.to_path_buf())];
    for d in SYSTEM_DIRS {
        let p = host.join(d);
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        if md.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&p) {
                ops.push(JailOp::Symlink { target, at: root.join(d) });
            }
        } else if md.is_dir() {
            ops.push(JailOp::Mkdir(root.join(d)));
            ops.push(JailOp::Bind { src: p, dst: root.join(d), writable: false, device: false });
        }
    }
    ops.push(JailOp::Mkdir(root.join("etc")));
    let cache = Path::new("/etc/ld.so.cache");
    if cache.is_file() {
        ops.push(JailOp::Touch(root.join("etc/ld.so.cache")));
        ops.push(JailOp::Bind {
            src: cache.into(),
            dst: root.join("etc/ld.so.cache"),
            writable: false,
            device: false,
        });
    }
    ops.push(JailOp::Mkdir(root.join("dev")));
    ops.push(JailOp::Tmpfs(root.join("dev")));
    let mut devices = vec!["null", "zero", "random", "urandom"];
    if accel == Accel::Kvm {
        devices.push("kvm");
    }
    for d in devices {
        let src = Path::new("/dev").join(d);
        if src.exists() {
            let dst = root.join("dev").join(d);
            ops.push(JailOp::Touch(dst.clone()));
            ops.push(JailOp::Bind { src, dst, writable: true, device: true });
        }
    }
    ops.push(JailOp::Mkdir(root.join("proc")));
    ops.push(JailOp::Proc(root.join("proc")));
    let vm = root.join(VM_DIR.trim_start_matches('/'));
    ops.push(JailOp::Mkdir(vm.clone()));
    ops.push(JailOp::Bind { src: dir.to_path_buf(), dst: vm, writable: true, device: false });
    JailPlan { root: root.to_path_buf(), ops, cwd: PathBuf::from(VM_DIR) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jail_holds_programs_read_only_four_devices_proc_and_its_own_directory() {
        let root = Path::new("/state/vm/jail");
        let p = plan(root, Path::new("/state/sandboxes/vm-1"), Accel::Tcg);
        assert_eq!(p.ops[0], JailOp::Tmpfs(root.into()), "the root is a fresh tmpfs first");
        assert_eq!(p.cwd, Path::new("/vm"));
        let binds: Vec<(&Path, &Path, bool, bool)> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                JailOp::Bind { src, dst, writable, device } => {
                    Some((src.as_path(), dst.as_path(), *writable, *device))
                }
                _ => None,
            })
            .collect();
        // Writable: the four device nodes and the VM's own directory, nothing else.
        let writable: Vec<&Path> = binds.iter().filter(|b| b.2).map(|b| b.0).collect();
        assert_eq!(
            writable,
            ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/state/sandboxes/vm-1"].map(Path::new),
            "{binds:?}"
        );
        assert!(binds.iter().all(|b| b.3 == b.0.starts_with("/dev/")), "only device nodes keep dev");
        assert!(binds.iter().all(|b| b.1.starts_with(root)), "{binds:?}");
        // No state directory, no /etc beyond the loader's cache, no /tmp, /home, /root, /run.
        for host in ["/etc", "/tmp", "/home", "/root", "/run", "/var", "/sys", "/dev/kvm"] {
            assert!(!binds.iter().any(|b| b.0 == Path::new(host)), "{host} is in the jail");
        }
        assert!(p.ops.contains(&JailOp::Proc(root.join("proc"))));
        let kvm = plan(root, Path::new("/state/sandboxes/vm-1"), Accel::Kvm);
        assert!(
            kvm.ops.iter().any(|o| matches!(o, JailOp::Bind { src, .. } if src == Path::new("/dev/kvm")))
                || !Path::new("/dev/kvm").exists()
        );
    }
}
