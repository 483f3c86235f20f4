//! `executor debug JOB`: a shell, or `--command CMD`, in the sandbox kept for a failed job on
//! this host (`EXECUTOR_KEEP_FAILED`), with the failed step's image, user, working directory,
//! environment less secrets and files as the step left them, no network, on a terminal when
//! standard input and output are one; the exit status is the shell's. `--list` shows what is kept
//! and until when. Each attach is recorded in the job's log on the coordinator (who, when, how
//! long).

use anyhow::{Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::time::Instant;

use super::executor::ConfigArgs;
use crate::base::exit::{ExitError, USAGE};
use crate::config::{table::Values, Needs, Settings};
use crate::sandbox::kept;

#[derive(Debug, Clone, Args)]
pub struct DebugArgs {
    /// The kept job: its id, or `<id>-<queue>` when several queues kept one with that id
    #[arg(required_unless_present = "list")]
    pub job: Option<String>,
    /// Run CMD with `/bin/sh -c` instead of an interactive shell, and exit with its status
    #[arg(long, value_name = "CMD")]
    pub command: Option<String>,
    /// List the sandboxes kept for debugging on this host, and until when
    #[arg(long, conflicts_with_all = ["job", "command"])]
    pub list: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Runs `executor debug`; returns the exit status (the shell's when attached).
pub(crate) fn run(a: DebugArgs) -> Result<i32> {
    if a.list {
        let values = Values::parse(&a.config.raw).map_err(|e| ExitError::new(USAGE, format!("{e:#}")))?;
        return list(&values.state_dir);
    }
    let settings = Settings::load(&a.config.raw, Needs::DocumentOnly)
        .map_err(|e| anyhow::Error::new(ExitError::new(USAGE, format!("{e:#}"))))?;
    let job = a.job.as_deref().unwrap_or_default();
    let k = kept::find(&settings.state_dir, job)?;
    if k.until <= chrono::Utc::now() {
        anyhow::bail!(
            "the sandbox of job {} was kept until {}; the janitor releases it",
            k.job_uid,
            k.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
    let rt = crate::sandbox::open(k.sandbox.runtime, &settings.runtime_options())?;
    let tty = a.command.is_none() && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let code = rt.debug(&k.sandbox, &k.step, a.command.as_deref(), tty)?;
    let attach = crate::protocol::DebugAttach {
        executor_name: k.executor.clone(),
        job_id: k.job_id,
        who: who(),
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        duration_ms: t0.elapsed().as_millis() as u64,
        command: a.command.clone(),
        exit_code: code,
    };
    record(&settings, &k, &attach);
    Ok(code)
}

/// The host user attaching: the one behind sudo, else the login name, else the uid.
fn who() -> String {
    ["SUDO_USER", "LOGNAME", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
}

/// Records the attach in the job's log; a coordinator that cannot (Sourcegraph has no such
/// route) is told on standard error, never a failure of the attach.
fn record(settings: &Settings, k: &kept::KeptSandbox, attach: &crate::protocol::DebugAttach) {
    let res = settings
        .client(&k.frontend_url, &k.executor)
        .context("connecting to the coordinator")
        .and_then(|c| c.debug_attach(&k.queue, attach).map_err(anyhow::Error::new));
    match res {
        Ok(true) => {}
        Ok(false) => eprintln!("executor: warning: the coordinator has no record of attaches (not ours?)"),
        Err(e) => {
            eprintln!("executor: warning: the attach was not recorded in job {}'s log: {e:#}", k.job_uid)
        }
    }
}

fn list(state_dir: &std::path::Path) -> Result<i32> {
    let all = kept::list(state_dir);
    if all.is_empty() {
        eprintln!("executor: no sandbox is kept for debugging here");
        return Ok(crate::base::exit::OK);
    }
    println!("{:<16} {:<22} {:<22} {:>10}  STEP", "JOB", "KEPT", "UNTIL", "DISK");
    for k in all {
        let t = |d: chrono::DateTime<chrono::Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        println!(
            "{:<16} {:<22} {:<22} {:>10}  {} ({})",
            k.job_uid,
            t(k.kept_at),
            t(k.until),
            crate::base::units::format_bytes(k.disk_bytes),
            k.step.key,
            k.step.image
        );
    }
    Ok(crate::base::exit::OK)
}
