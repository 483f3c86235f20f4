//! `complete`'s choice to keep a failed job's sandbox for `executor debug JOB` instead of tearing
//! it down (`EXECUTOR_KEEP_FAILED`, shortened or turned off per queue by our coordinator's
//! policy in the job): only a job that failed in one of its steps (exited non-zero or was
//! killed; not one canceled, past its deadline or stopped by a shutdown), only within the caps
//! (the oldest kept released first),
//! and with the step's environment less every secret. The job is still marked failed as usual,
//! which revokes its token.

use chrono::Utc;
use std::time::Duration;

use super::run_steps::step_key;
use super::JobCtx;
use crate::document::{EndedBy, FailureKind, RunDocument};
use crate::sandbox::kept::{self, KeptSandbox, KeptStep};
use crate::sandbox::RuntimeKind;

/// How long this job's sandbox may be kept: the executor's setting, at most the queue's policy.
pub(crate) fn keep_for(host: Option<Duration>, queue_policy: Option<u64>) -> Option<Duration> {
    let host = host?;
    let d = match queue_policy {
        Some(secs) => host.min(Duration::from_secs(secs)),
        None => host,
    };
    (!d.is_zero()).then_some(d)
}

/// The failed docker step of `doc` (its index in the job), if a step failed by itself.
fn failed_step(ctx: &JobCtx, doc: &RunDocument) -> Option<usize> {
    let rec = doc.steps.iter().find(|s| {
        s.ended_by == Some(EndedBy::Killed) || (s.ended_by.is_none() && s.exit_code.is_some_and(|c| c != 0))
    })?;
    ctx.job.docker_steps.iter().enumerate().position(|(i, st)| step_key(&st.key, i) == rec.key)
}

/// Keeps the sandbox of `doc` when the policy says so; returns whether it did (the sandbox and
/// the workspace are then the kept registry's). Every refusal past the policy is said in the
/// job's log.
pub(crate) fn keep_if_failed(ctx: &JobCtx, doc: &RunDocument) -> bool {
    let Some(dur) = keep_for(ctx.settings.keep_failed, ctx.job.keep_failed_seconds) else { return false };
    // A step that failed by itself is an errored job in the contract's table (failed_step
    // below tells it from a cancel, a deadline or a shutdown).
    let failed =
        doc.outcome.as_ref().is_some_and(|f| matches!(f.kind, FailureKind::Errored | FailureKind::Failed));
    let (Some(sb), Some(ws)) = (doc.sandbox.as_ref(), doc.workspace.as_ref()) else { return false };
    if !failed || ctx.cancel.check().is_some() || doc.completion.is_some() {
        return false;
    }
    let Some(i) = failed_step(ctx, doc) else { return false };
    if ctx.settings.keep_failed_max == 0 {
        return false;
    }
    let Ok(mut entry) = ctx.logger.entry("teardown.keep", None) else { return false };
    let state_dir = &ctx.settings.state_dir;
    let opts = ctx.settings.runtime_options();
    // The workspace, and a VM's disks beside it (an oci sandbox's layer is in its workspace).
    let vm_disks = if sb.runtime == RuntimeKind::Microvm { kept::disk_usage(&sb.state_dir) } else { 0 };
    let disk = kept::disk_usage(&ws.path) + vm_disks;
    let (max, max_disk) = (ctx.settings.keep_failed_max, ctx.settings.keep_failed_disk);
    if disk > max_disk {
        entry.line(&format!(
            "not kept for debugging: its {} are more than EXECUTOR_KEEP_FAILED_DISK ({})",
            crate::base::units::format_bytes(disk),
            crate::base::units::format_bytes(max_disk)
        ));
        let _ = entry.finish(0);
        return false;
    }
    // An earlier run of the same job (the coordinator retried it) gives way.
    let (earlier, others): (Vec<_>, Vec<_>) =
        kept::list(state_dir).into_iter().partition(|k| k.job_uid == doc.job.uid);
    for old in &earlier {
        if let Err(e) = kept::release(&opts, old) {
            tracing::warn!(job_id = %old.job_uid, "releasing the kept sandbox of an earlier run: {e:#}");
        }
    }
    let sizes: Vec<u64> = others.iter().map(|k| k.disk_bytes).collect();
    for old in others.iter().take(kept::over_caps(&sizes, Some(disk), max, max_disk)) {
        match kept::release(&opts, old) {
            Ok(()) => {
                tracing::info!(job_id = %old.job_uid, "kept sandbox released to make room for job {}", doc.job.uid)
            }
            Err(e) => tracing::warn!(job_id = %old.job_uid, "releasing a kept sandbox: {e:#}"),
        }
    }
    let step = &ctx.job.docker_steps[i];
    let kept_step = KeptStep {
        key: step_key(&step.key, i),
        image: step.image.clone(),
        dir: step.dir.clone(),
        env: kept::less_secrets(&step.env, |v| ctx.redact(v) != v),
    };
    let res = ctx.runtime(doc).and_then(|rt| rt.keep(sb)).and_then(|record| {
        let now = Utc::now();
        let k = KeptSandbox {
            job_uid: doc.job.uid.clone(),
            job_id: doc.job.id,
            queue: doc.executor.queue.clone(),
            executor: doc.executor.name.clone(),
            frontend_url: doc.executor.frontend_url.clone(),
            kept_at: now,
            until: now + chrono::Duration::from_std(dur).unwrap_or(chrono::Duration::MAX),
            sandbox: record,
            workspace: ws.path.clone(),
            step: kept_step,
            disk_bytes: disk,
        };
        kept::save(state_dir, &k)?;
        Ok(k)
    });
    let kept = match res {
        Ok(k) => {
            entry.line(&format!(
                "kept for debugging on {} until {} ({} on disk, network none): run `{}` on that host",
                k.executor,
                k.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                crate::base::units::format_bytes(k.disk_bytes),
                k.command()
            ));
            true
        }
        Err(e) => {
            entry.line(&format!("not kept for debugging: {}", ctx.redact(&format!("{e:#}"))));
            false
        }
    };
    let _ = entry.finish(0);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_policy_shortens_or_turns_off_never_extends() {
        let h = Some(Duration::from_secs(600));
        assert_eq!(keep_for(h, None), h);
        assert_eq!(keep_for(h, Some(60)), Some(Duration::from_secs(60)));
        assert_eq!(keep_for(h, Some(6000)), h);
        assert_eq!(keep_for(h, Some(0)), None);
        assert_eq!(keep_for(None, Some(60)), None, "the host's operator opts in");
    }
}
