//! Hand-written man page sections appended to the generated ones (roff), for what flags cannot
//! say: the run document, exit statuses, the sandbox set-up order.

/// Extra roff for the man page named `name` (`executor`, `executor-run-steps`, ...).
pub fn man_section(name: &str) -> Option<&'static str> {
    match name {
        "executor" => Some(EXIT_STATUS),
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
