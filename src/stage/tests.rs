//! Stage logic against the fake runtime (`sandbox::fake`): skips after a failure, how a
//! failure is classified, where a resumed document continues, and the loop's prepare-and-boot.
//! No sandbox and no coordinator: log entries go to memory.

use std::sync::Arc;

use super::*;
use crate::base::cancel::CancelReason;
use crate::document::{EndedBy, ExecutorIdentity, FailureKind, StepRecord, WorkspaceRecord};
use crate::logs::tests::MemoryLogs;
use crate::protocol::{DockerStep, Job, VirtualMachineFile};
use crate::sandbox::fake::{Call, FakePool, FakeRuntime, Script};
use crate::sandbox::{Runtime, RuntimeKind, SandboxRecord, StepEnd};

const SECRET: &str = "the-shared-secret-0123456789";

/// Settings for a job in `state_dir`, the workspace a plain directory (no disk limit). The one
/// place these tests build settings.
fn settings(state_dir: &std::path::Path) -> Settings {
    let mut raw = crate::config::Raw::default();
    raw.set("state_dir", state_dir).set("disk_space", "0").set("image_pull", "never");
    Settings::from_raw(&raw, crate::base::secret::Secret::new(SECRET), crate::config::Needs::DocumentOnly)
        .unwrap()
}

fn job(steps: &[(&str, &str)]) -> Job {
    let mut j = Job { id: 7, token: "ab".repeat(20), ..Default::default() };
    for (key, dir) in steps {
        j.docker_steps.push(DockerStep {
            key: key.to_string(),
            image: "alpine".into(),
            dir: dir.to_string(),
            commands: vec!["true".into()],
            ..Default::default()
        });
    }
    j
}

/// A job's context and fresh document, the fake as its runtime, its log in memory.
fn ctx_for(state: &tempfile::TempDir, job: Job, rt: &FakeRuntime) -> (JobCtx, RunDocument, Arc<MemoryLogs>) {
    let identity = ExecutorIdentity {
        name: "host-1".into(),
        frontend_url: "http://127.0.0.1:1".into(),
        queue: "batches".into(),
        multi_queue: false,
        runtime: rt.kind(),
        version: "0.1.0".into(),
        log_append: true,
    };
    let doc = RunDocument::new(identity, &job, SECRET, None).unwrap();
    let mut ctx = JobCtx::new(Arc::new(settings(state.path())), &doc, Some(Cancel::new())).unwrap();
    let logs = Arc::new(MemoryLogs::default());
    ctx.logger = JobLogger::new(logs.clone(), ctx.logger.redactor().clone(), true);
    ctx.fake_runtime = Some(Arc::new(rt.clone()));
    (ctx, doc, logs)
}

/// The document as `vm-boot` leaves it: a workspace with one script per step, and a sandbox.
fn booted(state: &tempfile::TempDir, ctx: &JobCtx, doc: &mut RunDocument) {
    let ws = state.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    doc.workspace = Some(WorkspaceRecord {
        path: ws.clone(),
        scripts: (0..ctx.job.docker_steps.len()).map(|i| format!("s{i}.sh")).collect(),
        repository_cloned: false,
        startup_script: None,
    });
    doc.sandbox = Some(SandboxRecord::new(doc.executor.runtime, "executor-fake", ws));
}

fn runs(keys: &[&str]) -> Vec<Call> {
    keys.iter().map(|k| Call::Run(k.to_string())).collect()
}

fn stages(doc: &RunDocument) -> Vec<&str> {
    doc.history.iter().map(|h| h.stage.as_str()).collect()
}

#[test]
fn a_stage_after_a_failure_is_skipped_and_does_nothing() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    doc.fail("prepare-workspace", FailureKind::Failed, "no clone");
    let before = doc.clone();
    for st in [Stage::VmBoot, Stage::RunSteps, Stage::Upload] {
        assert_eq!(run_stage(st, &ctx, &mut doc).unwrap(), StageResult::Skipped, "{}", st.name());
    }
    assert_eq!(rt.calls(), vec![]);
    assert_eq!(doc, before, "a skipped stage leaves the document as it was");
}

#[test]
fn steps_run_in_order_and_the_stage_is_recorded() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let (ctx, mut doc, logs) = ctx_for(&state, job(&[("", ""), ("", ""), ("named", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Done);
    assert_eq!(rt.calls(), runs(&["step.docker.0", "step.docker.1", "step.docker.named"]));
    assert_eq!(doc.outcome, None);
    assert!(doc.steps.iter().all(|s| s.exit_code == Some(0) && s.ended_by.is_none()), "{:?}", doc.steps);
    assert_eq!(stages(&doc), ["run-steps"]);
    drop(ctx);
    let keys: Vec<String> = logs.entries.lock().unwrap().iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, ["step.docker.0", "step.docker.1", "step.docker.named"]);
}

/// batcheshelper's `pre` names the step after the last one when a dynamic `if:` skips the rest:
/// every step left is skipped and the job completes, as with Sourcegraph's executor; a name
/// that is neither a step nor past the end is still an error.
#[test]
fn a_skip_past_the_last_step_completes() {
    let keys = [
        ("step.0.pre", ""),
        ("step.0.run", ""),
        ("step.0.post", ""),
        ("step.1.pre", ""),
        ("step.1.run", ""),
        ("step.1.post", ""),
    ];
    for (next, ok) in
        [("step.2.pre", true), ("step.7.pre", true), ("step.1.post", true), ("step.x.pre", false)]
    {
        let state = tempfile::tempdir().unwrap();
        let mut script = Script::default();
        let skip = (state.path().join("ws/skip.json"), format!(r#"{{"nextStep":"{next}"}}"#));
        script.writes.insert("step.docker.step.0.pre".into(), skip);
        let rt = FakeRuntime::new(script);
        let (ctx, mut doc, _) = ctx_for(&state, job(&keys), &rt);
        booted(&state, &ctx, &mut doc);
        let got = run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap();
        if !ok {
            assert_eq!(got, StageResult::Failed, "{next}");
            assert!(doc.outcome.unwrap().message.contains("which the job does not have"));
            continue;
        }
        assert_eq!(got, StageResult::Done, "{next}: {:?}", doc.outcome);
        let want: &[&str] = if next == "step.1.post" {
            &["step.docker.step.0.pre", "step.docker.step.1.post"]
        } else {
            &["step.docker.step.0.pre"]
        };
        assert_eq!(rt.calls(), runs(want), "{next}");
    }
}

#[test]
fn a_failing_step_ends_the_job_as_errored() {
    let state = tempfile::tempdir().unwrap();
    let mut script = Script::default();
    script.ends.insert("step.docker.1".into(), StepEnd::Exited(3));
    let rt = FakeRuntime::new(script);
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", ""), ("", ""), ("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Failed);
    assert_eq!(rt.calls(), runs(&["step.docker.0", "step.docker.1"]), "the job ends at the failing step");
    let f = doc.outcome.clone().unwrap();
    assert_eq!((f.stage.as_str(), f.kind), ("run-steps", FailureKind::Errored));
    assert_eq!(f.message, "running step.docker.1: command failed with exit code 3");
    let codes: Vec<Option<i32>> = doc.steps.iter().map(|s| s.exit_code).collect();
    assert_eq!(codes, [Some(0), Some(3)]);
    assert_eq!(stages(&doc), ["run-steps"], "a failed stage is in the history too");
}

#[test]
fn failures_are_classified_by_how_the_step_ended() {
    let cases: Vec<(StepEnd, FailureKind, &str, i32, Option<EndedBy>)> = vec![
        (
            StepEnd::Signaled(9),
            FailureKind::Errored,
            "running step.docker.0: killed by signal 9",
            137,
            Some(EndedBy::Killed),
        ),
        (
            StepEnd::Stopped(CancelReason::Canceled),
            FailureKind::Canceled,
            "job canceled",
            -1,
            Some(EndedBy::Stopped(CancelReason::Canceled)),
        ),
        (
            StepEnd::Stopped(CancelReason::Deadline),
            FailureKind::Errored,
            "job exceeded maximum execution time of",
            -1,
            Some(EndedBy::Stopped(CancelReason::Deadline)),
        ),
        (
            StepEnd::Stopped(CancelReason::Shutdown),
            FailureKind::Errored,
            "executor shut down while step.docker.0 was running",
            -1,
            Some(EndedBy::Stopped(CancelReason::Shutdown)),
        ),
    ];
    for (end, kind, message, code, ended_by) in cases {
        let state = tempfile::tempdir().unwrap();
        let mut script = Script::default();
        script.ends.insert("step.docker.0".into(), end);
        let rt = FakeRuntime::new(script);
        let (ctx, mut doc, _) = ctx_for(&state, job(&[("", ""), ("", "")]), &rt);
        booted(&state, &ctx, &mut doc);
        assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Failed, "{end:?}");
        let f = doc.outcome.clone().unwrap();
        assert_eq!(f.kind, kind, "{end:?}");
        assert!(f.message.starts_with(message), "{end:?}: {}", f.message);
        assert_eq!(
            doc.steps,
            vec![StepRecord {
                key: "step.docker.0".into(),
                exit_code: Some(code),
                duration_ms: doc.steps[0].duration_ms,
                ended_by
            }]
        );
        assert_eq!(rt.calls(), runs(&["step.docker.0"]));
    }
}

#[test]
fn an_infrastructure_error_is_errored_and_says_what_broke() {
    let state = tempfile::tempdir().unwrap();
    let mut script = Script::default();
    script.errors.insert("step.docker.0".into(), "the OCI runtime vanished".into());
    let rt = FakeRuntime::new(script);
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", ""), ("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Failed);
    let f = doc.outcome.clone().unwrap();
    assert_eq!(f.kind, FailureKind::Errored, "retryable: the job itself did not fail");
    assert_eq!(f.message, "running step.docker.0: the OCI runtime vanished");
    assert_eq!((doc.steps[0].exit_code, doc.steps[0].ended_by), (Some(-1), None));
    // Canceled meanwhile: the cancel, not the error, is the outcome.
    let state = tempfile::tempdir().unwrap();
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    ctx.cancel.cancel(CancelReason::Canceled);
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Failed);
    assert_eq!(doc.outcome.unwrap().kind, FailureKind::Canceled);
}

#[test]
fn a_document_without_what_the_stage_needs_is_refused_untouched() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    doc.sandbox = None;
    let err = run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap_err();
    assert!(err.downcast_ref::<Incomplete>().is_some(), "{err:#}");
    assert!(doc.history.is_empty() && doc.outcome.is_none());
    assert_eq!(rt.calls(), vec![]);
}

#[test]
fn a_resumed_document_continues_after_the_steps_that_succeeded() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", ""), ("", ""), ("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    if let Some(ws) = doc.workspace.as_mut() {
        ws.startup_script = Some("startup.sh".into());
    }
    let record = |i: usize, code| StepRecord {
        key: format!("step.docker.{i}"),
        exit_code: Some(code),
        duration_ms: 1,
        ended_by: None,
    };
    // Step 0 succeeded, step 1 was interrupted: it runs again, the startup script does not.
    doc.steps = vec![record(0, 0), record(1, -1)];
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Done);
    assert_eq!(rt.calls(), runs(&["step.docker.1", "step.docker.2"]));
    let codes: Vec<(&str, Option<i32>)> = doc.steps.iter().map(|s| (s.key.as_str(), s.exit_code)).collect();
    assert_eq!(codes, [("step.docker.0", Some(0)), ("step.docker.1", Some(0)), ("step.docker.2", Some(0))]);
    // From the start, the startup script runs first.
    let rt = FakeRuntime::default();
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    if let Some(ws) = doc.workspace.as_mut() {
        ws.startup_script = Some("startup.sh".into());
    }
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Done);
    assert_eq!(rt.calls(), runs(&["setup.startup-script", "step.docker.0"]));
}

#[test]
fn prepare_and_boot_boots_during_the_clone_and_makes_the_first_step_ahead() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new(Script { boots_during_clone: true, makes_ahead: true, ..Default::default() });
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", ""), ("", "")]), &rt);
    prepare_and_boot(&ctx, &mut doc).unwrap();
    assert_eq!(doc.outcome, None);
    assert_eq!(stages(&doc), ["prepare-workspace", "vm-boot"], "the clone is recorded first");
    assert_eq!(rt.calls(), vec![Call::Boot(vec!["alpine".into()]), Call::Prepare("step.docker.0".into())]);
    let ws = doc.workspace.clone().unwrap();
    assert_eq!(ws.scripts.len(), 2, "the workspace was filled");
    assert_eq!(doc.sandbox.as_ref().map(|s| s.name.as_str()), Some("executor-fake"));
}

#[test]
fn prepare_and_boot_keeps_the_sandbox_of_a_failed_clone_and_makes_nothing_ahead() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new(Script { boots_during_clone: true, makes_ahead: true, ..Default::default() });
    // The first step starts in a directory of the repository: made ahead only once the clone
    // is done, and here the workspace's fill fails (a file outside the workspace).
    let mut j = job(&[("", "sub")]);
    j.files.insert("../outside".into(), VirtualMachineFile { content: b"x".to_vec(), ..Default::default() });
    let (ctx, mut doc, _) = ctx_for(&state, j, &rt);
    prepare_and_boot(&ctx, &mut doc).unwrap();
    let f = doc.outcome.clone().unwrap();
    assert_eq!(f.stage, "prepare-workspace", "{}", f.message);
    assert_eq!(rt.calls(), vec![Call::Boot(vec!["alpine".into()])], "nothing made ahead");
    assert!(doc.sandbox.is_some(), "the boot's sandbox is the document's, for `complete` to remove");
    assert_eq!(stages(&doc), ["prepare-workspace", "vm-boot"]);
}

#[test]
fn prepare_and_boot_records_a_failed_boot_after_the_clone() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new(Script { boot_error: Some("no runc here".into()), ..Default::default() });
    let (ctx, mut doc, _) = ctx_for(&state, job(&[("", "")]), &rt);
    prepare_and_boot(&ctx, &mut doc).unwrap();
    let f = doc.outcome.clone().unwrap();
    assert_eq!((f.stage.as_str(), f.kind), ("vm-boot", FailureKind::Errored));
    assert_eq!(f.message, "starting the fake sandbox: no runc here");
    assert!(doc.workspace.as_ref().is_some_and(|w| w.scripts.len() == 1), "the clone went on");
    assert_eq!(doc.sandbox, None);
    assert_eq!(rt.calls(), vec![Call::Boot(vec!["alpine".into()])]);
    // The stages after it are skipped, and the runtime sees nothing more.
    assert_eq!(run_stage(Stage::RunSteps, &ctx, &mut doc).unwrap(), StageResult::Skipped);
    assert_eq!(rt.calls().len(), 1);
}

#[test]
fn vm_boot_takes_a_sandbox_booted_ahead_of_its_own_runtime_only() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let ws = state.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let ready = SandboxRecord::new(rt.kind(), "executor-warm", &ws);
    let pool = Arc::new(FakePool {
        runtime: rt.kind(),
        ready: std::sync::Mutex::new(Some(ready.clone())),
        taken: Default::default(),
    });
    let boot = |pool: Arc<FakePool>| {
        let (mut ctx, mut doc, logs) = ctx_for(&state, job(&[("", "")]), &rt);
        booted(&state, &ctx, &mut doc);
        doc.sandbox = None;
        ctx.warm_pool = Some(pool);
        assert_eq!(run_stage(Stage::VmBoot, &ctx, &mut doc).unwrap(), StageResult::Done);
        drop(ctx);
        let out = logs
            .entries
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.key == "setup.fake.start")
            .and_then(|e| e.out.clone());
        (doc, out.unwrap_or_default())
    };
    // A hit: the pool's sandbox is the job's, and the runtime boots nothing.
    let (doc, out) = boot(pool.clone());
    assert_eq!(doc.sandbox, Some(ready));
    assert!(out.contains("took executor-warm from the fake pool"), "{out}");
    assert_eq!(rt.calls(), vec![]);
    // A miss: the runtime boots one, and the entry says why.
    let (doc, out) = boot(pool.clone());
    assert_eq!(doc.sandbox.map(|s| s.name), Some("executor-fake".into()));
    assert!(out.contains("the fake pool is empty: booting one"), "{out}");
    assert_eq!(rt.calls(), vec![Call::Boot(vec!["alpine".into()])]);
    assert_eq!(*pool.taken.lock().unwrap(), 2);
    // Another runtime's pool is never asked.
    let other = RuntimeKind::ALL.into_iter().find(|k| *k != rt.kind()).unwrap();
    let other = Arc::new(FakePool { runtime: other, ready: Default::default(), taken: Default::default() });
    boot(other.clone());
    assert_eq!(*other.taken.lock().unwrap(), 0);
}

#[test]
fn a_cli_steps_job_fails_at_once_with_the_advice_where_the_runtime_has_no_engine() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let job: Job = serde_json::from_str(include_str!("../../tests/it/fixtures/batches-legacy.json")).unwrap();
    let (ctx, mut doc, logs) = ctx_for(&state, job, &rt);
    assert_eq!(run_stage(Stage::PrepareWorkspace, &ctx, &mut doc).unwrap(), StageResult::Failed);
    let failure = doc.outcome.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Failed);
    for advice in
        ["native-ssbc-execution", "EXECUTOR_RUNTIME=microvm", "the fake runtime cannot run cliSteps"]
    {
        assert!(failure.message.contains(advice), "{}", failure.message);
    }
    assert!(doc.workspace.is_none(), "nothing was made for a job that cannot run");
    drop(ctx);
    let entries = logs.entries.lock().unwrap();
    let entry = entries.iter().find(|e| e.key == "setup.cli-steps").expect("a setup.cli-steps entry");
    assert!(entry.out.as_deref().unwrap_or("").contains("native-ssbc-execution"), "{entry:?}");
    assert_eq!(entry.exit_code, Some(1));
}

/// `teardown.cache`: only a trusted job that succeeded and wrote something saves; every other
/// says why not, and nothing reaches the store; a second run of `complete` says nothing again.
#[test]
fn teardown_cache_saves_only_trusted_successful_jobs() {
    use crate::cache::{CacheStore, Lookup};
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let (ctx, mut doc, logs) = ctx_for(&state, job(&[("a", "")]), &rt);
    booted(&state, &ctx, &mut doc);
    let upper = state.path().join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::write(upper.join("pkg"), "p").unwrap();
    let record = |key: &str, trusted: bool| crate::document::CacheRecord {
        key: key.repeat(32),
        repository: "r".into(),
        prefix: "p".into(),
        paths: vec!["/root/.p".into()],
        version: None,
        miss: "no version yet".into(),
        uppers: vec![upper.clone()],
        uid_base: nix::unistd::geteuid().as_raw(),
        whiteout_files: false,
        trusted,
        trust: if trusted { "queue batches is trusted".into() } else { "not the default branch".into() },
        saved: None,
    };
    let store = CacheStore::new(state.path());
    // A failed job saves nothing, trusted or not.
    doc.caches = vec![record("aa", true)];
    doc.fail("run-steps", FailureKind::Failed, "step failed");
    super::cache::teardown(&ctx, &mut doc, true, None);
    assert_eq!(doc.caches[0].saved.as_deref(), Some("not saved: the job did not succeed"));
    doc.outcome = None;
    // An untrusted job that succeeded: not saved, and why; a trusted one saves.
    doc.caches = vec![record("bb", false), record("cc", true)];
    super::cache::teardown(&ctx, &mut doc, true, None);
    let saved: Vec<_> = doc.caches.iter().map(|c| c.saved.clone().unwrap()).collect();
    assert_eq!(saved[0], "not saved: the job is not trusted: not the default branch");
    assert!(saved[1].starts_with("saved a new version, 1 bytes in "), "{saved:?}");
    assert!(matches!(store.lookup(&"bb".repeat(32)), Lookup::Miss { .. }));
    assert!(matches!(store.lookup(&"cc".repeat(32)), Lookup::Hit { .. }));
    // The sandbox still up (its overlay may be mounted): never saved.
    doc.caches = vec![record("dd", true)];
    super::cache::teardown(&ctx, &mut doc, false, None);
    assert_eq!(doc.caches[0].saved.as_deref(), Some("not saved: the sandbox was not torn down"));
    let before = logs.entries.lock().unwrap().len();
    super::cache::teardown(&ctx, &mut doc, true, None);
    assert_eq!(logs.entries.lock().unwrap().len(), before, "done once per document");
    let entries = logs.entries.lock().unwrap();
    let said: Vec<_> = entries.iter().filter(|e| e.key == "teardown.cache").collect();
    assert_eq!(said.len(), 3);
    assert!(said[1].out.as_deref().unwrap_or("").contains("not the default branch"), "{said:?}");
}

/// `setup.cache` on a runtime that attaches no caches: the job runs without them, the entry
/// says why, nothing stays leased and the sandbox's record is the one before.
#[test]
fn setup_cache_without_runtime_support_runs_the_job_without_caches() {
    let state = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::default();
    let mut j = job(&[("a", "")]);
    j.caches = vec![crate::protocol::CacheDecl {
        key: crate::protocol::CacheKeyDecl { files: vec!["lock".into()], prefix: "p".into() },
        paths: vec!["/root/.p".into()],
    }];
    let (ctx, mut doc, logs) = ctx_for(&state, j, &rt);
    booted(&state, &ctx, &mut doc);
    assert!(super::cache::applies(&ctx));
    let mut sandbox = doc.sandbox.clone().unwrap();
    super::cache::setup(&ctx, &mut doc, &rt, &mut sandbox).unwrap();
    assert!(doc.caches.is_empty());
    assert_eq!(doc.sandbox.as_ref(), Some(&sandbox));
    let leases = state.path().join("caches/leases");
    assert_eq!(std::fs::read_dir(&leases).map(|r| r.count()).unwrap_or(0), 0);
    let entries = logs.entries.lock().unwrap();
    let entry = entries.iter().find(|e| e.key == "setup.cache").expect("a setup.cache entry");
    let out = entry.out.as_deref().unwrap_or("");
    assert!(
        out.contains("miss (no version yet)") && out.contains("does not attach dependency caches"),
        "{out}"
    );
}
