//! The OCI `config.json` of one step's container, written by one ordered function
//! ([`bundle_config`]) so that the whole sandbox can be read top to bottom in the order the
//! runtime applies it. docs/sandbox-oci.md and the man page follow the same order.

use serde_json::{json, Value};
use std::path::PathBuf;

use crate::image::ID_COUNT;

/// The default PATH inside a step when the step's env does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// HOME inside a step: the writable tmpfs, since the image root is read-only.
pub const HOME: &str = "/tmp";

/// Everything a step's container is made from.
#[derive(Debug, Clone)]
pub struct StepContainer {
    /// The image's read-only root tree (the sandbox's idmapped mount of it).
    pub rootfs: PathBuf,
    /// Host uid/gid that container root maps to: the sandbox's own range (see uids.rs).
    pub id_base: u32,
    /// Host directory mounted read-write at `/data`.
    pub workspace: PathBuf,
    /// Working directory inside (`/data/<dir>`).
    pub cwd: String,
    pub args: Vec<String>,
    /// The step's own `NAME=value` environment (PATH and HOME are added when absent).
    pub env: Vec<String>,
    /// cgroup path of the container, below the job's cgroup.
    pub cgroups_path: String,
    /// Size of the `/tmp` tmpfs in bytes.
    pub tmp_bytes: u64,
    /// RLIMIT_FSIZE (largest file a step can write), 0 for unlimited.
    pub max_file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
}

/// The job's network, for a step of a networked sandbox.
#[derive(Debug, Clone)]
pub struct StepNetwork {
    /// The job's network namespace (`/run/netns/<sandbox>`), which the container joins.
    pub netns: PathBuf,
    /// The sandbox's resolv.conf, bound read-only over the image's `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// Syscalls the seccomp filter denies with EPERM: mounting and namespaces of any kind, kernel
/// modules and kexec, tracing other processes, bpf, the kernel keyring, perf, handle-based opens
/// (the "shocker" escape), clock and swap changes, reboot, and other host-wide knobs.
pub const DENIED_SYSCALLS: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "open_by_handle_at",
    "name_to_handle_at",
    "reboot",
    "swapon",
    "swapoff",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "acct",
    "quotactl",
    "syslog",
    "iopl",
    "ioperm",
    "userfaultfd",
    "lookup_dcookie",
    "uselib",
    "vhangup",
    "nfsservctl",
    "get_kernel_syms",
    "query_module",
    "_sysctl",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;

/// The container's `config.json`, built in the order the sandbox is set up.
pub fn bundle_config(c: &StepContainer, net: Option<&StepNetwork>) -> Value {
    // 1. Namespaces: every kind, all new but the network's with a job network. The user
    //    namespace maps container root to an unprivileged host range; the network namespace
    //    has only `lo`, or is the job's (owned by the host's user namespace, so container root
    //    cannot change its addresses, routes or firewall).
    let namespaces: Vec<Value> = ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"]
        .iter()
        .map(|t| match net {
            Some(n) if *t == "network" => json!({ "type": t, "path": n.netns }),
            _ => json!({ "type": t }),
        })
        .collect();
    let id_map = json!([{ "containerID": 0, "hostID": c.id_base, "size": ID_COUNT }]);

    // 2. Root filesystem: the image tree, read-only.
    let root = json!({ "path": c.rootfs, "readonly": true });

    // 3. Mounts: kernel filesystems, a small /dev, a private tmpfs /tmp and the workspace at /data.
    let mounts = json!([
        { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
          "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
        { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
          "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
        { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
          "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=67108864"] },
        { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
        { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
          "options": ["nosuid", "nodev", "mode=1777", format!("size={}", c.tmp_bytes)] },
        { "destination": "/data", "type": "bind", "source": c.workspace, "options": ["rbind", "rw", "nosuid", "nodev"] },
    ]);
    let mut mounts = mounts;
    // sysfs can only be mounted by the owner of the network namespace: in the job's namespace
    // (the host's) /sys is an empty read-only tmpfs instead, which shows nothing of the host.
    if let (Some(list), Some(_)) = (mounts.as_array_mut(), net) {
        for m in list.iter_mut().filter(|m| m["destination"] == "/sys") {
            *m = json!({ "destination": "/sys", "type": "tmpfs", "source": "tmpfs",
                         "options": ["nosuid", "noexec", "nodev", "ro", "size=4k"] });
        }
    }
    if let (Some(list), Some(resolv)) = (mounts.as_array_mut(), net.and_then(|n| n.resolv_conf.as_ref())) {
        list.push(json!({ "destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
                          "options": ["bind", "ro", "nosuid", "nodev", "noexec"] }));
    }

    // 4. /proc and /sys: paths that reveal or change the host are masked or read-only.
    let masked = json!([
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/proc/kmsg",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
        "/sys/kernel"
    ]);
    let readonly = json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]);

    // 5. cgroup: the container joins a child of the job's cgroup, whose memory, CPU and process
    //    limits cover every step of the job (see cgroup.rs); devices are denied but the runtime's
    //    standard set (null, zero, full, random, urandom, tty, ptmx).
    let resources = json!({ "devices": [{ "allow": false, "access": "rwm" }] });

    // 6. seccomp: allow by default, deny the listed syscalls and new user namespaces; clone3 answers
    //    ENOSYS so that libc falls back to clone, whose flags the filter can inspect.
    let mut syscalls = vec![json!({ "names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1 })];
    for (name, arg) in [("clone", 0), ("unshare", 0)] {
        syscalls.push(json!({
            "names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{ "index": arg, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ" }]
        }));
    }
    syscalls.push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 }));
    let seccomp = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    });

    // 7. Capabilities: none; no_new_privs so setuid files and file capabilities grant nothing.
    let caps = json!({ "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] });

    // 8. rlimits.
    let mut rlimits = vec![
        json!({ "type": "RLIMIT_NOFILE", "hard": c.max_open_files, "soft": c.max_open_files }),
        json!({ "type": "RLIMIT_CORE", "hard": 0, "soft": 0 }),
        json!({ "type": "RLIMIT_MEMLOCK", "hard": 65536, "soft": 65536 }),
    ];
    if c.max_file_bytes > 0 {
        rlimits.push(json!({ "type": "RLIMIT_FSIZE", "hard": c.max_file_bytes, "soft": c.max_file_bytes }));
    }

    // 9. The process: container root, the step's environment only, in /data/<dir>.
    let process = json!({
        "terminal": false,
        "user": { "uid": 0, "gid": 0 },
        "args": c.args,
        "env": step_env(&c.env),
        "cwd": c.cwd,
        "capabilities": caps,
        "rlimits": rlimits,
        "noNewPrivileges": true,
        "oomScoreAdj": 1000,
    });

    json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": root,
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "uidMappings": id_map,
            "gidMappings": id_map,
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "cgroupsPath": c.cgroups_path,
            "resources": resources,
            "seccomp": seccomp,
        }
    })
}

/// The step's environment: its own variables, plus PATH and HOME unless it sets them.
pub fn step_env(env: &[String]) -> Vec<String> {
    let has = |k: &str| env.iter().any(|e| e.split_once('=').map(|(n, _)| n) == Some(k));
    let mut out = Vec::with_capacity(env.len() + 2);
    if !has("PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOME") {
        out.push(format!("HOME={HOME}"));
    }
    out.extend(env.iter().filter(|e| e.contains('=')).cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StepContainer {
        StepContainer {
            rootfs: "/img/rootfs".into(),
            id_base: crate::image::ID_BASE + ID_COUNT,
            workspace: "/ws".into(),
            cwd: "/data/repo".into(),
            args: vec!["/bin/sh".into(), "/data/step.sh".into()],
            env: vec!["A=1".into()],
            cgroups_path: "/executor/sb/c1".into(),
            tmp_bytes: 1 << 20,
            max_file_bytes: 0,
            max_open_files: 1024,
        }
    }

    #[test]
    fn config_isolates_every_way_the_issue_lists() {
        let v = bundle_config(&sample(), None);
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"]);
        assert_eq!(v["linux"]["uidMappings"][0]["containerID"], 0);
        assert_eq!(v["linux"]["uidMappings"][0]["hostID"], crate::image::ID_BASE + ID_COUNT);
        assert_eq!(v["linux"]["gidMappings"][0]["hostID"], crate::image::ID_BASE + ID_COUNT);
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        for set in ["bounding", "effective", "inheritable", "permitted", "ambient"] {
            assert_eq!(v["process"]["capabilities"][set], json!([]), "{set}");
        }
        let denied = v["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap();
        for s in [
            "mount",
            "ptrace",
            "kexec_load",
            "init_module",
            "finit_module",
            "bpf",
            "keyctl",
            "perf_event_open",
            "open_by_handle_at",
        ] {
            assert!(denied.iter().any(|d| d == s), "{s} not denied");
        }
        let dests: Vec<&str> =
            v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert!(dests.contains(&"/tmp") && dests.contains(&"/data"));
        assert_eq!(v["process"]["cwd"], "/data/repo");
        assert!(v["linux"]["readonlyPaths"].as_array().unwrap().iter().any(|p| p == "/proc/sysrq-trigger"));
    }

    #[test]
    fn a_networked_step_joins_the_jobs_namespace() {
        let net =
            StepNetwork { netns: "/run/netns/sb".into(), resolv_conf: Some("/state/sb/resolv.conf".into()) };
        let v = bundle_config(&sample(), Some(&net));
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let netns = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(netns["path"], "/run/netns/sb");
        assert!(ns.iter().filter(|n| n["type"] != "network").all(|n| n.get("path").is_none()));
        let mounts = v["mounts"].as_array().unwrap();
        let sys = mounts.iter().find(|m| m["destination"] == "/sys").unwrap();
        assert_eq!(sys["type"], "tmpfs", "no sysfs of the host's network namespace");
        let resolv = mounts.iter().find(|m| m["destination"] == "/etc/resolv.conf").unwrap();
        assert_eq!(resolv["source"], "/state/sb/resolv.conf");
        assert!(resolv["options"].as_array().unwrap().iter().any(|o| o == "ro"));
        let plain = bundle_config(&sample(), None);
        assert!(plain["linux"]["namespaces"].as_array().unwrap().iter().all(|n| n.get("path").is_none()));
        assert!(!plain["mounts"].as_array().unwrap().iter().any(|m| m["destination"] == "/etc/resolv.conf"));
    }

    #[test]
    fn environment_is_only_the_steps_plus_path_and_home() {
        assert_eq!(
            step_env(&["A=1".into()]),
            vec![format!("PATH={DEFAULT_PATH}"), "HOME=/tmp".into(), "A=1".into()]
        );
        assert_eq!(step_env(&["PATH=/x".into(), "HOME=/h".into()]), vec!["PATH=/x", "HOME=/h"]);
    }
}
