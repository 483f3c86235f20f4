//! `run-steps`: runs the job's steps in order inside its sandbox, each streamed as the log entry
//! `step.docker.<key|index>`. The first failing step ends the job; a cancel or the deadline stops
//! the running step and everything it started. A batch job's `.pre` step may name the next step
//! to run in `skip.json`, or one past the last, which skips every step left and completes.

use anyhow::{Context, Result};
use std::time::Instant;

use super::{deadline_message, Incomplete, JobCtx, StageFailure};
use crate::base::cancel::CancelReason;
use crate::document::{EndedBy, FailureKind, RunDocument, StepRecord};
use crate::sandbox::{OutputSink, StepEnd, StepSpec};

/// The log key of docker step `index`.
pub(crate) fn step_key(key: &str, index: usize) -> String {
    if key.is_empty() {
        format!("step.docker.{index}")
    } else {
        format!("step.docker.{key}")
    }
}

/// Makes the first step's sandboxed process ahead, in this process, while the workspace may
/// still be filling (see [`crate::sandbox::Runtime::prepare_step`]); `run` then only starts it.
/// A failure only costs the time it saves, and is logged.
pub(crate) fn prepare_first(ctx: &JobCtx, doc: &RunDocument) {
    let (Some(sandbox), Some(step)) = (&doc.sandbox, ctx.job.docker_steps.first()) else {
        return;
    };
    // The operator's startup script runs first, as a step of its own whose end kills whatever
    // is left in the job's cgroup.
    if ctx.settings.vm_startup_script.is_some() {
        return;
    }
    // A step's spec binds the job's caches, attached once the workspace is cloned.
    if super::cache::applies(ctx) {
        return;
    }
    let key = step_key(&step.key, 0);
    let script =
        crate::workspace::scripts::script_path(ctx.job.id, 0, &ctx.job.repository_name, &ctx.job.commit);
    let spec = StepSpec { key: &key, image: &step.image, script: &script, dir: &step.dir, env: &step.env };
    let Ok(runtime) = ctx.runtime(doc) else { return };
    let started = Instant::now();
    let made = runtime.prepare_step(sandbox, &spec);
    if matches!(made, Ok(false)) {
        return;
    }
    let Ok(mut entry) = ctx.logger.entry(&format!("setup.{}.ahead", runtime.name()), None) else { return };
    match made {
        Ok(_) => {
            entry.line(&format!(
                "making the sandboxed process of {key} ahead, while the workspace fills (started in {} ms)",
                started.elapsed().as_millis()
            ));
            let _ = entry.finish(0);
        }
        Err(e) => {
            entry.line(&format!("{key} was not made ahead: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
        }
    }
}

pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    let ws = doc.workspace.clone().ok_or_else(|| {
        Incomplete("the run document has no workspace: run `executor prepare-workspace` first".into())
    })?;
    let mut sandbox = doc
        .sandbox
        .clone()
        .ok_or_else(|| Incomplete("the run document has no sandbox: run `executor vm-boot` first".into()))?;
    if ws.scripts.len() != ctx.job.docker_steps.len() {
        return Err(Incomplete(format!(
            "the run document's workspace has {} scripts for {} steps",
            ws.scripts.len(),
            ctx.job.docker_steps.len()
        ))
        .into());
    }
    let runtime = ctx.runtime(doc)?;
    // A document resumed after an interruption restarts after the steps already done.
    let mut i = doc.steps.iter().take_while(|s| s.exit_code == Some(0)).count();
    doc.steps.truncate(i);
    if i == 0 {
        super::cache::setup(ctx, doc, &*runtime, &mut sandbox)?;
    }
    let sandbox = sandbox;
    let cache_env = super::cache::step_env(&doc.caches);
    if let (0, Some(script)) = (i, &ws.startup_script) {
        run_startup_script(ctx, &*runtime, &sandbox, script)?;
    }
    while i < ctx.job.docker_steps.len() {
        let step = &ctx.job.docker_steps[i];
        if let Some(reason) = ctx.cancel.check() {
            return Err(stopped(ctx, reason, &step_key(&step.key, i)));
        }
        let key = step_key(&step.key, i);
        // Whether each cache hit comes first: the job's own variables win.
        let env: Vec<String> = cache_env.iter().chain(&step.env).cloned().collect();
        let spec =
            StepSpec { key: &key, image: &step.image, script: &ws.scripts[i], dir: &step.dir, env: &env };
        let mut entry = ctx.logger.entry(&key, Some(runtime.step_command(&sandbox, &spec)))?;
        let started = Instant::now();
        let span = crate::base::trace::span(key.clone());
        span.set("executor.step.index", i as i64);
        let mut noted = LimitNotes { entry: &mut entry, hit: Vec::new() };
        let end = runtime.run_step(&sandbox, &spec, &mut noted, &ctx.cancel);
        let because = if noted.hit.is_empty() {
            String::new()
        } else {
            format!(": the step hit the job's {}", noted.hit.join("; and the job's "))
        };
        let duration_ms = started.elapsed().as_millis() as i64;
        let result = if matches!(end, Ok(StepEnd::Exited(0))) { "success" } else { "failure" };
        crate::api::metrics::registry().observe(
            crate::api::metrics::STEP_SECONDS,
            &[runtime.name(), result],
            started.elapsed().as_secs_f64(),
        );
        let (code, ended_by) = super::run_steps::close_entry(ctx, &end, &mut entry);
        span.set("executor.step.exit_code", code as i64);
        drop(span);
        let flushed = entry.finish(code);
        doc.steps.push(StepRecord { key: key.clone(), exit_code: Some(code), duration_ms, ended_by });
        match end.with_context(|| format!("running {key}"))? {
            StepEnd::Exited(0) => {}
            StepEnd::Exited(c) => anyhow::bail!("running {key}: command failed with exit code {c}{because}"),
            StepEnd::Signaled(s) => anyhow::bail!("running {key}: killed by signal {s}{because}"),
            StepEnd::Stopped(CancelReason::Deadline) if !because.is_empty() => {
                return Err(StageFailure {
                    kind: FailureKind::Errored,
                    message: format!("{}{because}", deadline_message(&ctx.settings)),
                }
                .into())
            }
            StepEnd::Stopped(r) => return Err(stopped(ctx, r, &key)),
        }
        flushed?;
        i += 1;
        if step.key.ends_with(".pre") {
            if let Some(next) = skip_to(&ws.path, &step.dir)? {
                match ctx.job.docker_steps.iter().position(|s| s.key == next) {
                    Some(j) if j > i => i = j,
                    Some(_) => {}
                    None if past_the_end(&next, &ctx.job.docker_steps) => {
                        // batcheshelper's way of saying a dynamic `if:` skips every step left:
                        // Sourcegraph's executor skips them and completes the job.
                        tracing::info!(
                            job = ctx.job.id,
                            "skip.json after {key} names {next}, past the last step: skipping the {} steps left",
                            ctx.job.docker_steps.len() - i
                        );
                        break;
                    }
                    None => anyhow::bail!(
                        "skip.json after {key} names step {next:?}, which the job does not have"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// Runs the operator's startup script (entry `setup.startup-script`) from the workspace root,
/// with no environment of the job's: in the first step's image, or where the runtime has a
/// machine of its own, there as root ([`crate::sandbox::STARTUP_SCRIPT_KEY`]).
fn run_startup_script(
    ctx: &JobCtx,
    runtime: &dyn crate::sandbox::Runtime,
    sandbox: &crate::sandbox::SandboxRecord,
    script: &str,
) -> Result<()> {
    let Some(first) = ctx.job.docker_steps.first() else { return Ok(()) };
    let key = crate::sandbox::STARTUP_SCRIPT_KEY;
    let spec = StepSpec { key, image: &first.image, script, dir: "", env: &[] };
    let mut entry = ctx.logger.entry(key, Some(runtime.step_command(sandbox, &spec)))?;
    let end = runtime.run_step(sandbox, &spec, &mut entry, &ctx.cancel);
    let code = match &end {
        Ok(StepEnd::Exited(c)) => *c,
        Ok(StepEnd::Signaled(s)) => 128 + s,
        _ => -1,
    };
    if let Err(e) = &end {
        entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
    }
    let flushed = entry.finish(code);
    match end.context("failed to run startup script")? {
        StepEnd::Exited(0) => {}
        StepEnd::Exited(c) => {
            anyhow::bail!("failed to run startup script: command failed with exit code {c}")
        }
        StepEnd::Signaled(s) => anyhow::bail!("failed to run startup script: killed by signal {s}"),
        StepEnd::Stopped(r) => return Err(stopped(ctx, r, key)),
    }
    flushed
}

/// The step's log entry, remembering which of the job's limits the runtime said it hit.
struct LimitNotes<'a> {
    entry: &'a mut crate::logs::LogEntry,
    hit: Vec<String>,
}

impl OutputSink for LimitNotes<'_> {
    fn output(&mut self, stream: crate::sandbox::Stream, data: &[u8]) {
        self.entry.output(stream, data);
    }
    fn limit_hit(&mut self, what: &str) {
        self.entry.limit_hit(what);
        self.hit.push(what.to_string());
    }
    fn note(&mut self, line: &str) {
        self.entry.note(line);
    }
}

/// A step's exit code and how it ended, as its log entry and the run document record them; an
/// error of the runtime's is said on the entry's last line (redacted).
pub(crate) fn close_entry(
    ctx: &JobCtx,
    end: &Result<StepEnd>,
    entry: &mut crate::logs::LogEntry,
) -> (i32, Option<EndedBy>) {
    if let Err(e) = end {
        entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
    }
    match end {
        Ok(StepEnd::Exited(c)) => (*c, None),
        Ok(StepEnd::Signaled(s)) => (128 + s, Some(EndedBy::Killed)),
        Ok(StepEnd::Stopped(r)) => (-1, Some(EndedBy::Stopped(*r))),
        Err(_) => (-1, None),
    }
}

pub(crate) fn stopped(ctx: &JobCtx, reason: CancelReason, key: &str) -> anyhow::Error {
    match reason {
        CancelReason::Canceled => {
            StageFailure { kind: FailureKind::Canceled, message: "job canceled".into() }.into()
        }
        CancelReason::Deadline => {
            StageFailure { kind: FailureKind::Errored, message: deadline_message(&ctx.settings) }.into()
        }
        CancelReason::Shutdown => StageFailure {
            kind: FailureKind::Errored,
            message: format!("executor shut down while {key} was running"),
        }
        .into(),
    }
}

/// Whether `next` names the `.pre` step of a batch step after the job's last one
/// (`step.<N+1>.pre`, where the job's steps go up to `step.<N>.*`).
fn past_the_end(next: &str, steps: &[crate::protocol::DockerStep]) -> bool {
    let index = |key: &str| key.strip_prefix("step.")?.split_once('.')?.0.parse::<u64>().ok();
    let Some(n) = next.strip_suffix(".pre").and_then(|_| index(next)) else { return false };
    steps.iter().filter_map(|s| index(&s.key)).all(|m| m < n)
}

/// The batches skip protocol: after a `.pre` step, `<dir>/skip.json` may name the next step. The
/// step may have left anything there, so the file is reached beneath the workspace without
/// following a symlink, read only if it is a small regular file, and removed as itself.
fn skip_to(ws: &std::path::Path, dir: &str) -> Result<Option<String>> {
    use std::io::Read;
    let rel = if dir.is_empty() { "skip.json".to_string() } else { format!("{dir}/skip.json") };
    crate::base::fs::confined(ws, &rel)?;
    let tree = crate::base::fs::Beneath::open(ws)?;
    let path = std::path::Path::new(&rel);
    let refuse = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => {
            anyhow::anyhow!("{rel} goes through a symlink or leaves the workspace: refusing to read it")
        }
        _ => anyhow::anyhow!("inspecting {rel}: {e}"),
    };
    let meta = match tree.lstat(path) {
        Ok(m) => m,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => return Ok(None),
        Err(e) => return Err(refuse(e)),
    };
    if meta.is_symlink() {
        anyhow::bail!("{rel} is a symlink: refusing to read it");
    }
    if !meta.is_file() || meta.size > MAX_SKIP_JSON {
        anyhow::bail!("{rel} is not a small regular file");
    }
    let mut text = String::new();
    tree.open_file(path)
        .map_err(refuse)?
        .take(MAX_SKIP_JSON + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {rel}"))?;
    if text.len() as u64 > MAX_SKIP_JSON {
        anyhow::bail!("{rel} is not a small regular file");
    }
    tree.remove_file(path).with_context(|| format!("removing {rel}"))?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Skip {
        next_step: String,
    }
    let skip: Skip = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!("{rel} is not {{\"nextStep\": ...}} (line {}, column {})", e.line(), e.column())
    })?;
    Ok(Some(skip.next_step))
}

/// The largest `skip.json` read.
const MAX_SKIP_JSON: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_skip_protocol() {
        assert_eq!(step_key("", 2), "step.docker.2");
        assert_eq!(step_key("step.0.pre", 0), "step.docker.step.0.pre");
        let d = tempfile::tempdir().unwrap();
        assert_eq!(skip_to(d.path(), "").unwrap(), None);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/skip.json"), r#"{"nextStep":"step.2.pre"}"#).unwrap();
        assert_eq!(skip_to(d.path(), "sub").unwrap().as_deref(), Some("step.2.pre"));
        assert!(!d.path().join("sub/skip.json").exists(), "skip.json is consumed");
        assert!(skip_to(d.path(), "../x").is_err());
    }

    #[test]
    fn skip_json_never_reached_through_a_symlink() {
        let ws = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let hostfile = host.path().join("skip.json");
        std::fs::write(&hostfile, "host-only-content").unwrap();
        // The step replaced its directory with a symlink out of the workspace, or skip.json
        // itself with one.
        std::os::unix::fs::symlink(host.path(), ws.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(&hostfile, ws.path().join("skip.json")).unwrap();
        for dir in ["sub", ""] {
            let err = format!("{:#}", skip_to(ws.path(), dir).unwrap_err());
            assert!(err.contains("symlink"), "{err}");
            assert!(!err.contains("host-only-content"), "{err}");
            assert!(!err.contains(&host.path().display().to_string()), "{err}");
            assert_eq!(std::fs::read_to_string(&hostfile).unwrap(), "host-only-content", "{dir:?}");
        }
        assert!(ws.path().join("skip.json").symlink_metadata().is_ok(), "the symlink stays, untouched");
        // Not a regular file: refused without opening it (a FIFO would block).
        nix::unistd::mkfifo(&ws.path().join("fifo-dir-skip"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(ws.path().join("f")).unwrap();
        nix::unistd::mkfifo(&ws.path().join("f/skip.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(skip_to(ws.path(), "f").is_err());
    }
}
