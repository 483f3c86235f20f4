//! A job's `cliSteps` (Sourcegraph's legacy batch path, sent while the instance's
//! `native-ssbc-execution` feature flag is off): whether the runtime runs them at all (checked
//! in `prepare-workspace`, so that a job it cannot run fails at once with the advice that
//! helps), the step images their batch spec names (`input.json`'s `steps[].container`, which
//! `vm-boot` pulls through the image store), and running each as `src <command…>` after the
//! docker steps, logged as `step.src.<key|index>`.

use anyhow::{Context, Result};
use std::time::Instant;

use super::JobCtx;
use crate::document::{RunDocument, StepRecord};
use crate::protocol::Job;
use crate::sandbox::{CliStepSpec, StepEnd};

/// The log key of cliStep `index`.
pub(crate) fn step_key(key: &str, index: usize) -> String {
    if key.is_empty() {
        format!("step.src.{index}")
    } else {
        format!("step.src.{key}")
    }
}

/// The batch spec file `src batch exec -f` reads: the first `-f` argument of a cliStep.
fn input_file(job: &Job) -> Option<String> {
    job.cli_steps.iter().find_map(|s| {
        s.command.iter().position(|a| a == "-f" || a == "--f").and_then(|i| s.command.get(i + 1)).cloned()
    })
}

/// The distinct images the job's batch spec runs its steps in (`steps[].container`), in order:
/// from the job's inline `input.json`, else the copy in the workspace.
pub(crate) fn step_images(job: &Job, workspace: &std::path::Path) -> Result<Vec<String>> {
    let name = input_file(job).unwrap_or_else(|| "input.json".into());
    let inline = job.files.get(&name).map(|f| f.content.clone()).filter(|c| !c.is_empty());
    let bytes = match inline {
        Some(b) => b,
        None => {
            crate::base::fs::confined(workspace, &name)?;
            match std::fs::read(workspace.join(&name)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e).with_context(|| format!("reading {name}")),
            }
        }
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("the batch spec input {name} is not JSON"))?;
    let mut out: Vec<String> = Vec::new();
    for s in v.get("steps").and_then(|s| s.as_array()).into_iter().flatten() {
        if let Some(c) = s.get("container").and_then(|c| c.as_str()) {
            let c = c.trim();
            if !c.is_empty() && !out.iter().any(|o| o == c) {
                crate::image::Reference::parse(c)
                    .with_context(|| format!("step container {c:?} in {name}"))?;
                out.push(c.to_string());
            }
        }
    }
    Ok(out)
}

/// Runs the job's cliSteps after its docker steps, each `src <command…>` as its own log entry;
/// the first that fails ends the job (`failed to perform src-cli step: …`).
pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    if ctx.job.cli_steps.is_empty() {
        return Ok(());
    }
    let sandbox = doc.sandbox.clone().ok_or_else(|| {
        super::Incomplete("the run document has no sandbox: run `executor vm-boot` first".into())
    })?;
    let runtime = ctx.runtime(doc)?;
    for (i, step) in ctx.job.cli_steps.iter().enumerate() {
        let key = step_key(&step.key, i);
        if doc.steps.iter().any(|s| s.key == key && s.exit_code == Some(0)) {
            continue;
        }
        if let Some(reason) = ctx.cancel.check() {
            return Err(super::run_steps::stopped(ctx, reason, &key));
        }
        let spec = CliStepSpec { key: &key, args: &step.command, dir: &step.dir, env: &step.env };
        let mut entry = ctx.logger.entry(&key, Some(runtime.cli_step_command(&sandbox, &spec)))?;
        let started = Instant::now();
        let end = runtime.run_cli_step(&sandbox, &spec, &mut entry, &ctx.cancel);
        let (code, ended_by) = super::run_steps::close_entry(ctx, &end, &mut entry);
        let flushed = entry.finish(code);
        let duration_ms = started.elapsed().as_millis() as i64;
        doc.steps.push(StepRecord { key: key.clone(), exit_code: Some(code), duration_ms, ended_by });
        match end.with_context(|| format!("failed to perform src-cli step: running {key}"))? {
            StepEnd::Exited(0) => {}
            StepEnd::Exited(c) => {
                anyhow::bail!(
                    "failed to perform src-cli step: running {key}: command failed with exit code {c}"
                )
            }
            StepEnd::Signaled(s) => {
                anyhow::bail!("failed to perform src-cli step: running {key}: killed by signal {s}")
            }
            StepEnd::Stopped(r) => return Err(super::run_steps::stopped(ctx, r, &key)),
        }
        flushed?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CliStep, VirtualMachineFile};

    fn legacy_job() -> Job {
        let text = include_str!("../../tests/it/fixtures/batches-legacy.json");
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn the_batch_spec_s_containers_are_the_step_images() {
        let job = legacy_job();
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(step_images(&job, tmp.path()).unwrap(), vec!["alpine:3.19", "node:20-alpine"]);
        assert_eq!(step_key(&job.cli_steps[0].key, 0), "step.src.batch-exec");
        assert_eq!(step_key("", 2), "step.src.2");
        // From the workspace when the payload names the file by bucket and key.
        let mut job = Job {
            cli_steps: vec![CliStep {
                command: vec!["batch".into(), "exec".into(), "-f".into(), "spec.json".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        job.files.insert(
            "spec.json".into(),
            VirtualMachineFile { bucket: "b".into(), key: "k".into(), ..Default::default() },
        );
        std::fs::write(
            tmp.path().join("spec.json"),
            r#"{"steps":[{"container":"a:1"},{"container":"a:1"},{"run":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(step_images(&job, tmp.path()).unwrap(), vec!["a:1"]);
        std::fs::write(tmp.path().join("spec.json"), r#"{"steps":[{"container":"../bad name"}]}"#).unwrap();
        assert!(step_images(&job, tmp.path()).is_err());
    }
}
