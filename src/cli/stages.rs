//! The stage subcommands as processes: read the document, heartbeat for its job while working,
//! run the stage, write the document, and map the result to the documented exit status. Also
//! `validate` and `janitor`.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::api::new_executor_name;
use crate::base::exit::{self, ExitError};
use crate::config::Settings;
use crate::document;
use crate::stage::{run_stage, Incomplete, JobCtx, JobHeartbeat, Stage, StageResult};

/// `executor dequeue`.
pub(super) fn dequeue(settings: Settings, output: Option<&Path>, wait: Option<Duration>) -> Result<i32> {
    let runtime = crate::run_loop::resolve_runtime(&settings)
        .map_err(|e| ExitError::new(exit::USAGE, format!("{e:#}")))?;
    let client = settings.client(settings.frontend_url()?, &new_executor_name())?;
    client
        .ping(&settings.queues, settings.multi_queue)
        .map_err(|e| api_exit(e, "registering with the coordinator"))?;
    match crate::stage::dequeue::run(&settings, &client, runtime, wait) {
        Ok(Some(doc)) => {
            eprintln!("executor: dequeued job {} as {}", doc.job.uid, doc.executor.name);
            document::write(&doc, output)?;
            Ok(exit::OK)
        }
        Ok(None) => {
            eprintln!("executor: no job in {}", settings.queues.join(","));
            Ok(exit::NO_JOB)
        }
        Err(e) => Err(api_exit(e, "dequeuing").into()),
    }
}

fn api_exit(e: crate::api::ApiError, what: &str) -> ExitError {
    match e.status() {
        Some(401) | Some(403) => {
            ExitError::new(exit::USAGE, format!("{what}: the coordinator refused the shared secret ({e})"))
        }
        _ => ExitError::new(exit::TEMPFAIL, format!("{what}: {e}")),
    }
}

/// A stage subcommand.
pub(super) fn stage(
    stage: Stage,
    settings: Settings,
    input: Option<&Path>,
    output: Option<&Path>,
) -> Result<i32> {
    let mut doc = document::read(input)?;
    // The stage's lines name the job and the stage, as the loop's do.
    let _span = tracing::error_span!("job", job_id = %doc.job.uid, runtime = %doc.executor.runtime).entered();
    let _stage = tracing::error_span!("stage", stage = stage.name()).entered();
    let settings = Arc::new(settings);
    let ctx = JobCtx::new(settings.clone(), &doc, None)?;
    let heartbeat = doc.completion.is_none().then(|| {
        JobHeartbeat::start(ctx.client.clone(), &doc, ctx.cancel.clone(), settings.heartbeat_interval)
    });
    // SIGTERM/SIGINT stop the stage's work (a running step and all it started) and the failure
    // is recorded, instead of leaving the job to the stalled-job reset.
    if let Ok(sig) = crate::base::cancel::signals() {
        let cancel = ctx.cancel.clone();
        std::thread::spawn(move || {
            if let Ok(s) = sig.recv() {
                eprintln!("executor: {s}: stopping");
                cancel.cancel(crate::base::cancel::CancelReason::Shutdown);
            }
        });
    }
    let res = run_stage(stage, &ctx, &mut doc);
    drop(heartbeat);
    match res {
        Err(e) if e.downcast_ref::<Incomplete>().is_some() => {
            Err(ExitError::new(exit::BAD_DOCUMENT, format!("{}: {e}", stage.name())).into())
        }
        Err(e) => {
            // `complete` could not report: the document keeps what was torn down; run it again.
            document::write(&doc, output)?;
            Err(e)
        }
        Ok(r) => {
            document::write(&doc, output)?;
            if let (StageResult::Failed, Some(f)) = (r, &doc.outcome) {
                eprintln!("executor: {} failed: {}", stage.name(), f.message);
            }
            Ok(match (stage, r) {
                (Stage::Complete, _) => match &doc.completion {
                    Some(c) if c.reported == "completed" && c.accepted => exit::OK,
                    Some(c) => {
                        eprintln!(
                            "executor: job {} reported {}{}",
                            doc.job.uid,
                            c.reported,
                            if c.accepted { "" } else { " (not accepted: no longer ours)" }
                        );
                        exit::JOB_FAILED
                    }
                    None => exit::TEMPFAIL,
                },
                (_, StageResult::Failed) => exit::JOB_FAILED,
                _ => exit::OK,
            })
        }
    }
}

/// `executor validate`: prints each check; fails on the first problem.
pub(super) fn validate(settings: Settings) -> Result<i32> {
    let url = settings.frontend_url()?.to_string();
    println!(
        "ok: configuration (coordinator {url}, queues {}, runtime {})",
        settings.queues.join(","),
        settings.runtime
    );
    let client = settings.client(&url, &new_executor_name())?;
    match client.test_auth() {
        Ok(()) => println!("ok: the coordinator at {url} accepts the shared secret"),
        Err(e) if matches!(e.status(), Some(401) | Some(403)) => {
            return Err(ExitError::new(
                exit::JOB_FAILED,
                format!("the coordinator at {url} refused the shared secret: is EXECUTOR_FRONTEND_PASSWORD right? ({e})"),
            )
            .into())
        }
        Err(e) => {
            let advice = e.advice().map(|a| format!(": {a}")).unwrap_or_default();
            return Err(ExitError::new(exit::TEMPFAIL, format!("reaching the coordinator at {url}: {e}{advice}")).into());
        }
    }
    let rt = crate::sandbox::open_choice(settings.runtime, &settings.runtime_options())
        .map_err(|e| ExitError::new(exit::JOB_FAILED, format!("runtime {}: {e:#}", settings.runtime)))?;
    let checked =
        rt.check().map_err(|e| ExitError::new(exit::JOB_FAILED, format!("runtime {}: {e:#}", rt.name())))?;
    for c in checked {
        println!("ok: {c}");
    }
    // cliSteps (a default instance's batch changes) need src and an engine in the sandbox.
    match rt.cli_steps() {
        Ok(lines) => lines.iter().for_each(|l| println!("ok: cliSteps: {l}")),
        Err(e) => println!("note: cliSteps jobs will be failed: {e:#}"),
    }
    let (pool, budget) = settings.vm_pool(rt.kind())?;
    if rt.kind() == crate::sandbox::RuntimeKind::Microvm {
        println!(
            "ok: VM memory budget {} (3/4 of MemAvailable), {} per job VM (guest memory and QEMU's); \
             VM pool size {pool}{}, up to {} restored at once",
            crate::base::units::format_bytes(budget.total_bytes),
            crate::base::units::format_bytes(budget.job_bytes),
            if settings.vm_pool_size.is_some() {
                " (EXECUTOR_VM_POOL_SIZE)"
            } else {
                " (chosen from memory)"
            },
            settings.vm_pool_restores()
        );
    } else {
        println!("ok: no VM pool (runtime {})", rt.name());
    }
    let net = crate::network::check(&settings.network, &settings.state_dir)
        .map_err(|e| ExitError::new(exit::JOB_FAILED, format!("network: {e:#}")))?;
    for c in net {
        println!("ok: {c}");
    }
    let git = crate::base::proc::command("git").arg("version").env("PATH", GIT_PATH).output();
    let text = match git {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            return Err(ExitError::new(
                exit::JOB_FAILED,
                "git is not installed (needed to clone repositories)",
            )
            .into())
        }
    };
    match git_version(&text) {
        Some(v) if v >= MIN_GIT => println!("ok: {text}"),
        Some((major, minor)) => {
            return Err(ExitError::new(
                exit::JOB_FAILED,
                format!("git {major}.{minor} is too old: clones need git 2.26 or newer ({text})"),
            )
            .into())
        }
        None => println!("warning: cannot read git's version from {text:?}; clones need git 2.26 or newer"),
    }
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("creating the state directory {}", settings.state_dir.display()))?;
    println!("ok: state directory {}", settings.state_dir.display());
    println!("All checks passed!");
    Ok(exit::OK)
}

/// The oldest git that clones as the contract says (Sourcegraph's executor checks the same).
const MIN_GIT: (u32, u32) = (2, 26);
const GIT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `(major, minor)` of `git version 2.39.5` (or `git version 2.43.0.windows.1`).
fn git_version(text: &str) -> Option<(u32, u32)> {
    let v = text.strip_prefix("git version ")?.split_whitespace().next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `executor janitor`: one pass, printing what it removed.
pub(super) fn janitor(settings: Settings) -> Result<i32> {
    let removed = crate::run_loop::janitor_pass(&settings, "", &HashSet::new())?;
    for r in &removed {
        println!("removed {r}");
    }
    eprintln!("executor: janitor removed {} items", removed.len());
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_versions_are_read_and_compared() {
        assert_eq!(git_version("git version 2.39.5"), Some((2, 39)));
        assert_eq!(git_version("git version 2.43.0.windows.1"), Some((2, 43)));
        assert_eq!(git_version("git version 2.9.1"), Some((2, 9)));
        assert!(git_version("git version 2.9.1").unwrap() < MIN_GIT, "2.9 is older than 2.26");
        assert!(git_version("git version 2.26.0").unwrap() >= MIN_GIT);
        assert_eq!(git_version("hub version 2.14"), None);
    }
}
