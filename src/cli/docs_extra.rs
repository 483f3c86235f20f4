//! Hand-written man page sections appended to the generated ones (roff), for what flags cannot
//! say: the run document, exit statuses, the sandbox set-up order.

/// Extra roff for the man page named `name` (`executor`, `executor-run-steps`, ...).
pub(super) fn man_section(name: &str) -> Option<&'static str> {
    match name {
        "executor" => Some(EXIT_STATUS),
        "executor-image" => Some(OCI_SETUP_ORDER),
        "executor-dequeue"
        | "executor-prepare-workspace"
        | "executor-vm-boot"
        | "executor-run-steps"
        | "executor-upload"
        | "executor-complete" => Some(RUN_DOCUMENT),
        "executor-loop" => Some(LOOP),
        _ => None,
    }
}

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
0
the stage did its work (or skipped it because an earlier stage had failed and recorded why)
.TP
1
the job failed; the run document that was written says why
.TP
2
usage: bad flags or configuration
.TP
3
the input run document could not be read
.TP
4
dequeue: no job was available
.TP
75
a temporary infrastructure failure (the coordinator could not be reached); try again
"#;

const RUN_DOCUMENT: &str = r#".SH "RUN DOCUMENT"
Each stage reads one JSON run document (\fB--input\fR or standard input) and writes the updated
document (\fB--output\fR, atomically, or standard output); nothing else goes to standard output.
\fBdequeue\fR writes version, executor, job (a redacted summary), sealedJob (the job sealed with
a key derived from the shared secret) and deadline; \fBprepare-workspace\fR adds workspace;
\fBvm-boot\fR adds sandbox; \fBrun-steps\fR adds steps; \fBupload\fR adds artifacts;
\fBcomplete\fR adds completion. A stage that fails records the first failure in outcome
(stage, kind errored|failed|canceled, redacted message) and still writes the document; later stages
skip; \fBcomplete\fR reports it (markErrored, or markFailed for failed and canceled), tears down
the sandbox, removes the workspace, and is safe to run twice. While a stage works it heartbeats for
its job. See docs/run-document.md.
.SH "EXIT STATUS"
0 done (or skipped after an earlier failure; for complete: reported completed); 1 the job failed,
the document says why; 2 usage; 3 unreadable, foreign or incomplete input document (nothing
written); 4 dequeue found no job; 75 the coordinator could not be reached, try again.
"#;

const LOOP: &str = r#".SH "BEHAVIOUR"
Runs up to \fBEXECUTOR_MAXIMUM_NUM_JOBS\fR jobs at once, each through the same stage functions as
the subcommands (prepare-workspace, vm-boot, run-steps, upload, complete), in-process. It pings the
coordinator until it answers, then dequeues (with the coordinator's long poll where offered, else
every \fBEXECUTOR_QUEUE_POLL_INTERVAL\fR). One heartbeat every \fBEXECUTOR_HEARTBEAT_INTERVAL\fR
(5s) lists the running jobs: a job in cancelIds is stopped (its step and everything it started are
killed) and reported failed, which the coordinator records as canceled; a job missing from knownIds
is dropped from the heartbeat and runs on. A job past \fBEXECUTOR_MAXIMUM_RUNTIME_PER_JOB\fR is
killed and reported errored. A janitor removes, every \fBEXECUTOR_CLEANUP_TASK_INTERVAL\fR,
workspaces and sandboxes that no live job owns. Logs go to standard error; on a terminal, one
spinner per running job shows its current log entry.
.SH "SIGNALS"
SIGTERM or SIGINT: stop dequeuing; running jobs get \fBEXECUTOR_SHUTDOWN_GRACE\fR (30s) to
finish, then they are killed and reported errored; the loop exits 0. A second signal kills and
reports them at once.
\fBEXECUTOR_NUM_TOTAL_JOBS\fR and \fBEXECUTOR_MAX_ACTIVE_TIME\fR stop dequeuing the same way,
without a grace limit, for ephemeral hosts.
"#;

/// The `oci` sandbox, in the order `sandbox::oci` builds it (docs/sandbox-oci.md says more).
const OCI_SETUP_ORDER: &str = r#".SH "OCI SANDBOX SET-UP ORDER"
With \fB--runtime oci\fR each step runs in a fresh container made by \fBrunc\fR (default),
\fBcrun\fR or \fBrunsc\fR (\fB--oci-runtime\fR, \fBEXECUTOR_OCI_RUNTIME\fR). \fBvm-boot\fR resolves
every step image in the image store (an unknown image fails the job, naming it), records the
images as in use, creates the job cgroup \fBexecutor-oci/<sandbox>\fR with the job's memory, CPU
and process limits (cgroup v1 or v2), and gives the workspace to the container's root. Each step
then gets a container set up in this order:
.IP 1. 4
namespaces: user, pid, mount, network, ipc, uts, cgroup, all new; container uid and gid 0..65535
map to host 2000000000..2000065535, never to host root
.IP 2. 4
root: the image under a writable overlay layer of the step's own (on the workspace disk, counted by
its cap, removed when the step ends: each step is a fresh \fBdocker run --rm\fR)
.IP 3. 4
mounts: /proc, a private /dev (null, zero, full, random, urandom, tty, ptmx), /dev/pts, /dev/shm,
/dev/mqueue, /sys read-only, a size-limited tmpfs /tmp, the workspace read-write at /data
.IP 4. 4
/proc and /sys: kcore, keys, timer_list, sched_debug, /sys/firmware, /sys/kernel and others
masked; /proc/sys, /proc/sysrq-trigger, /proc/bus, /proc/fs, /proc/irq read-only
.IP 5. 4
cgroup: a child of the job cgroup; devices denied but the standard set
.IP 6. 4
seccomp: mount and the new mount API, setns, ptrace, process_vm_*, kexec, module loading, bpf,
keyctl, perf_event_open, open_by_handle_at, reboot, swap, clock changes and user namespaces
(unshare or clone with CLONE_NEWUSER) fail with EPERM; clone3 fails with ENOSYS
.IP 7. 4
capabilities: none; no_new_privs
.IP 8. 4
rlimits: 1024 open files, no core files, 64 KiB locked memory, files no larger than the disk cap
.IP 9. 4
process: the image config's User (resolved in the image's passwd and group) in /data/<dir>,
running the step script with the image's Env under the step's variables, PATH, and HOME from
the user's passwd entry (/ without one)
.PP
A cancel or the deadline kills the container and every process in the job cgroup within 2 s.
\fBcomplete\fR (teardown) and \fBjanitor\fR remove containers, cgroups, bundles and image use
records, and give the workspace back to its owner.
"#;
