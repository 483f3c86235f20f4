//! The OCI `config.json` of one step's container, written by one ordered function
//! ([`bundle_config`]) so that the whole sandbox can be read top to bottom in the order the
//! runtime applies it. docs/sandbox-oci.md and the man page follow the same order.

use serde_json::{json, Value};
use std::path::PathBuf;

use crate::image::ID_COUNT;

/// The default PATH inside a step when the step's env does not set one.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The container's host name (`/etc/hostname`, and its line in `/etc/hosts`).
pub(crate) const HOSTNAME: &str = "sandbox";

/// Everything a step's container is made from.
#[derive(Debug, Clone)]
pub(crate) struct StepContainer {
    /// The step's root: the image under a writable layer of its own (rootfs.rs).
    pub rootfs: PathBuf,
    /// Whether the root is mounted read-only.
    pub readonly_root: bool,
    /// The layer directory in /data, hidden under an empty read-only tmpfs.
    pub mask: Option<String>,
    /// The process's uid, gid and supplementary groups inside.
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Host uid/gid that container root maps to: the sandbox's own range (see uids.rs).
    pub id_base: u32,
    /// Host directory mounted read-write at `/data` (the reach directory's bind of it).
    pub workspace: PathBuf,
    /// Working directory inside (`/data/<dir>`).
    pub cwd: String,
    pub args: Vec<String>,
    /// The step's whole `NAME=value` environment (image's, step's, PATH and HOME: see
    /// `image::runas::environment`).
    pub env: Vec<String>,
    /// cgroup path of the container, below the job's cgroup.
    pub cgroups_path: String,
    /// Size of the `/tmp` tmpfs in bytes.
    pub tmp_bytes: u64,
    /// RLIMIT_FSIZE (largest file a step can write), 0 for unlimited.
    pub max_file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// The job's dependency caches: (destination, overlay) bound read-write, and their layer
    /// directories in /data, hidden as `mask` is (caches.rs).
    pub caches: Vec<(String, PathBuf)>,
    pub cache_masks: Vec<String>,
}

/// The job's network, for a step of a networked sandbox.
#[derive(Debug, Clone)]
pub(crate) struct StepNetwork {
    /// The job's network namespace (`/run/netns/<sandbox>`), which the container joins.
    pub netns: PathBuf,
    /// The sandbox's resolv.conf, bound read-only over the image's `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// Syscalls a step may make (x86-64 names; the same filter covers the x86 and x32 ABIs): Docker's
/// default allow list for amd64 without the groups it grants only with a capability (a step has
/// none), minus the deviations listed in [`REFUSED_FROM_DOCKER`], plus the newer calls glibc uses
/// (`fchmodat2`, `map_shadow_stack`, the `futex_*` family, `cachestat`). Every other call answers
/// EPERM; `clone`, `socket` and `personality` are allowed only with the arguments in
/// [`bundle_config`]'s seccomp section, and `clone3` answers ENOSYS.
pub(crate) const ALLOWED_SYSCALLS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Calls Docker's default profile allows without a capability that a step may not make (each
/// answers EPERM): `io_uring_*` (a large kernel attack surface that bypasses the filter for the
/// operations it submits; Docker 25 dropped them too), `ptrace` and `process_vm_readv/writev`
/// (Docker allows them on kernels 4.8 and later; a step cannot debug or trace), the read side of
/// the clock calls `adjtimex` and `clock_adjtime`, and `name_to_handle_at` (the first half of the
/// handle-based "shocker" escape), and `socketcall` (the 32-bit multiplexer would reach `socket`
/// with arguments the filter cannot see, AF_VSOCK included; i386 libc uses `socket` directly).
// The filter is an allow list: this list only documents what it leaves out, and a test checks it.
#[cfg(any(test, doc))]
pub(crate) const REFUSED_FROM_DOCKER: &[&str] = &[
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    "name_to_handle_at",
    "socketcall",
];

/// The namespace flags `clone` may not carry: `CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC |
/// NEWUSER | NEWPID | NEWNET` (Docker's mask 2114060288).
pub(crate) const CLONE_NAMESPACE_FLAGS: u64 = 0x7e02_0000;
/// `AF_VSOCK`: a vsock socket reaches the host or other VMs whatever the network namespace.
pub(crate) const AF_VSOCK: u64 = 40;
/// The `personality` values a step may set: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `PER_LINUX32 | UNAME26` and the query `0xffffffff` (never `READ_IMPLIES_EXEC` and the like).
pub(crate) const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The container's `config.json`, built in the order the sandbox is set up.
pub(crate) fn bundle_config(c: &StepContainer, net: Option<&StepNetwork>) -> Value {
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

    // 2. Root filesystem: the image under the step's own writable layer (see rootfs.rs).
    let root = json!({ "path": c.rootfs, "readonly": c.readonly_root });

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
    if let Some(list) = mounts.as_array_mut() {
        for (dest, source) in &c.caches {
            list.push(json!({ "destination": dest, "type": "bind", "source": source,
                              "options": ["rbind", "rw", "nosuid", "nodev"] }));
        }
        for mask in c.mask.iter().chain(&c.cache_masks) {
            list.push(json!({ "destination": mask, "type": "tmpfs", "source": "tmpfs",
                              "options": ["ro", "nosuid", "nodev", "noexec", "mode=000", "size=4k"] }));
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

    // 6. seccomp: an allow list (Docker's default profile as the baseline); everything else
    //    answers EPERM. `clone` without namespace flags, `socket` of any family but AF_VSOCK,
    //    `personality` with the listed values only; clone3 answers ENOSYS so that libc falls back
    //    to clone, whose flags the filter can inspect.
    let seccomp = seccomp_profile();

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

    // 9. The process: the image's user, the image's and the step's environment, in /data/<dir>.
    let mut user = json!({ "uid": c.uid, "gid": c.gid });
    if !c.groups.is_empty() {
        user["additionalGids"] = json!(c.groups);
    }
    let process = json!({
        "terminal": false,
        "user": user,
        "args": c.args,
        "env": c.env,
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
        "hostname": HOSTNAME,
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

/// The seccomp section of the config: see [`ALLOWED_SYSCALLS`] and [`REFUSED_FROM_DOCKER`].
pub(crate) fn seccomp_profile() -> Value {
    let mut syscalls = vec![json!({ "names": ALLOWED_SYSCALLS, "action": "SCMP_ACT_ALLOW" })];
    syscalls.push(json!({
        "names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{ "index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" }]
    }));
    syscalls.push(json!({
        "names": ["socket"], "action": "SCMP_ACT_ALLOW",
        "args": [{ "index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE" }]
    }));
    for persona in PERSONALITIES {
        syscalls.push(json!({
            "names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{ "index": 0, "value": persona, "op": "SCMP_CMP_EQ" }]
        }));
    }
    syscalls.push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 }));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StepContainer {
        StepContainer {
            rootfs: "/img/rootfs".into(),
            readonly_root: false,
            mask: Some("/data/.executor-root-1".into()),
            caches: vec![("/root/.npm".into(), "/run/executor-oci/sb/cache-0".into())],
            cache_masks: vec!["/data/.executor-cache-0".into()],
            uid: 0,
            gid: 0,
            groups: vec![],
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
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        for set in ["bounding", "effective", "inheritable", "permitted", "ambient"] {
            assert_eq!(v["process"]["capabilities"][set], json!([]), "{set}");
        }
        assert_eq!(v["linux"]["seccomp"], seccomp_profile());
        let dests: Vec<&str> =
            v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert!(dests.contains(&"/tmp") && dests.contains(&"/data"));
        let at = |d: &str| dests.iter().position(|x| *x == d).unwrap();
        assert!(at("/data") < at("/root/.npm") && at("/data") < at("/data/.executor-cache-0"), "{dests:?}");
        assert_eq!(v["process"]["cwd"], "/data/repo");
        assert!(v["linux"]["readonlyPaths"].as_array().unwrap().iter().any(|p| p == "/proc/sysrq-trigger"));
    }

    /// What the profile answers for `name` with first argument `arg0`, read from the JSON the
    /// runtime gets (the first matching rule wins; conditions on one rule are ANDed).
    fn verdict(profile: &Value, name: &str, arg0: u64) -> (String, i64) {
        for rule in profile["syscalls"].as_array().unwrap() {
            if !rule["names"].as_array().unwrap().iter().any(|n| n == name) {
                continue;
            }
            let matches = rule["args"].as_array().is_none_or(|args| {
                args.iter().all(|a| {
                    assert_eq!(a["index"], 0);
                    let value = a["value"].as_u64().unwrap();
                    match a["op"].as_str().unwrap() {
                        "SCMP_CMP_EQ" => arg0 == value,
                        "SCMP_CMP_NE" => arg0 != value,
                        "SCMP_CMP_MASKED_EQ" => arg0 & value == a["valueTwo"].as_u64().unwrap(),
                        op => panic!("unexpected op {op}"),
                    }
                })
            });
            if matches {
                let errno = rule["errnoRet"].as_i64().unwrap_or(0);
                return (rule["action"].as_str().unwrap().to_string(), errno);
            }
        }
        (profile["defaultAction"].as_str().unwrap().to_string(), profile["defaultErrnoRet"].as_i64().unwrap())
    }

    #[test]
    fn seccomp_is_an_allow_list_with_dockers_argument_filters() {
        let p = seccomp_profile();
        let eperm = ("SCMP_ACT_ERRNO".to_string(), 1);
        let allow = ("SCMP_ACT_ALLOW".to_string(), 0);
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        for name in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "setns",
            "unshare",
            "ptrace",
            "kexec_load",
            "init_module",
            "finit_module",
            "bpf",
            "keyctl",
            "add_key",
            "request_key",
            "perf_event_open",
            "open_by_handle_at",
            "name_to_handle_at",
            "userfaultfd",
            "reboot",
            "chroot",
            "sethostname",
            "socketcall",
            "a_syscall_nobody_listed",
        ] {
            assert_eq!(verdict(&p, name, 0), eperm, "{name}");
        }
        for name in REFUSED_FROM_DOCKER {
            assert!(!ALLOWED_SYSCALLS.contains(name), "{name} is both allowed and refused");
        }
        for name in ["read", "execve", "openat", "fchmodat2", "rseq", "wait4", "arch_prctl", "prctl"] {
            assert_eq!(verdict(&p, name, 0), allow, "{name}");
        }
        // clone: a thread or a process, never a namespace.
        assert_eq!(verdict(&p, "clone", 0x3d0f00), allow, "pthread_create's flags");
        assert_eq!(verdict(&p, "clone", 0x1200011), allow, "fork's flags");
        for flag in [0x20000u64, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000]
        {
            assert_eq!(verdict(&p, "clone", 0x11 | flag), eperm, "clone with {flag:#x}");
        }
        assert_eq!(verdict(&p, "clone3", 0), ("SCMP_ACT_ERRNO".to_string(), 38));
        // socket: every family but AF_VSOCK.
        assert_eq!(verdict(&p, "socket", 2), allow);
        assert_eq!(verdict(&p, "socket", 1), allow);
        assert_eq!(verdict(&p, "socket", 40), eperm);
        // personality: the listed personas; READ_IMPLIES_EXEC (0x0400000) and ADDR_NO_RANDOMIZE no.
        for ok in [0u64, 8, 0x20000, 0x20008, 0xffff_ffff] {
            assert_eq!(verdict(&p, "personality", ok), allow, "{ok:#x}");
        }
        for bad in [0x0400000u64, 0x0040000] {
            assert_eq!(verdict(&p, "personality", bad), eperm, "{bad:#x}");
        }
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
}
