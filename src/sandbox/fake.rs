//! A runtime for tests of the stages: it runs nothing, records every call it gets, and ends
//! each boot and step as its script says (a boot failure, a step's exit code or stop, an
//! infrastructure error), so that stage logic (skips, failure classification, resume,
//! prepare-and-boot) is tested without a sandbox; and a pool of sandboxes "booted ahead".

use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::shell::ShellDetails;
use super::{
    BootRequest, OutputSink, RecordDetails, Runtime, RuntimeKind, SandboxRecord, StepEnd, StepSpec, Stream,
};
use crate::base::cancel::Cancel;

/// One call the fake runtime got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// `boot`, with the images asked for.
    Boot(Vec<String>),
    /// `prepare_step` of a step key.
    Prepare(String),
    /// `run_step` of a step key.
    Run(String),
    Sync,
    /// `teardown` of a sandbox name.
    Teardown(String),
}

/// How the fake ends what it is asked to do. Everything succeeds unless said otherwise.
#[derive(Debug, Clone, Default)]
pub(crate) struct Script {
    /// `boot` fails with this message.
    pub boot_error: Option<String>,
    /// Step key -> how the step ends (default `Exited(0)`).
    pub ends: HashMap<String, StepEnd>,
    /// Step key -> `run_step` fails with this message (an infrastructure error, not the step's).
    pub errors: HashMap<String, String>,
    /// What [`Runtime::boots_during_clone`] answers.
    pub boots_during_clone: bool,
    /// What [`Runtime::prepare_step`] answers.
    pub makes_ahead: bool,
    /// Step key -> a file the step writes (host path, content), as a step writes `skip.json`.
    pub writes: HashMap<String, (std::path::PathBuf, String)>,
}

/// The fake runtime; clones share their calls.
#[derive(Clone, Default)]
pub(crate) struct FakeRuntime {
    pub script: Script,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeRuntime {
    pub(crate) fn new(script: Script) -> FakeRuntime {
        FakeRuntime { script, calls: Arc::default() }
    }

    /// The calls so far, in order.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn note(&self, c: Call) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Shell
    }

    fn name(&self) -> &'static str {
        "fake"
    }

    fn check(&self) -> Result<Vec<String>> {
        Ok(vec!["fake runtime".into()])
    }

    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord> {
        self.note(Call::Boot(req.images.clone()));
        if let Some(e) = &self.script.boot_error {
            bail!("{e}");
        }
        let name = format!("{}-fake", req.name_prefix);
        let mut rec = SandboxRecord::new(RuntimeKind::Shell, name, req.workspace);
        ShellDetails { workspace: req.workspace.to_path_buf() }.store(&mut rec);
        Ok(rec)
    }

    fn step_command(&self, _sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
        vec!["fake".into(), step.script.into()]
    }

    fn prepare_step(&self, _sandbox: &SandboxRecord, step: &StepSpec) -> Result<bool> {
        self.note(Call::Prepare(step.key.to_string()));
        Ok(self.script.makes_ahead)
    }

    fn run_step(
        &self,
        _sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        _cancel: &Cancel,
    ) -> Result<StepEnd> {
        self.note(Call::Run(step.key.to_string()));
        if let Some(e) = self.script.errors.get(step.key) {
            bail!("{e}");
        }
        if let Some((path, text)) = self.script.writes.get(step.key) {
            std::fs::write(path, text)?;
        }
        sink.output(Stream::Stdout, format!("ran {}\n", step.key).as_bytes());
        Ok(self.script.ends.get(step.key).copied().unwrap_or(StepEnd::Exited(0)))
    }

    fn sync_workspace(&self, _sandbox: &SandboxRecord, _workspace: &Path) -> Result<()> {
        self.note(Call::Sync);
        Ok(())
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        self.note(Call::Teardown(sandbox.name.clone()));
        Ok(())
    }

    fn janitor(&self, _prefix: &str, _live: &HashSet<String>) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn boots_during_clone(&self) -> bool {
        self.script.boots_during_clone
    }

    /// Nothing to pull: the fake runs no image.
    fn runs_images(&self) -> bool {
        false
    }
}

/// Sandboxes "booted ahead" for tests: each take hands out `ready` (once) or misses.
pub(crate) struct FakePool {
    pub runtime: RuntimeKind,
    pub ready: Mutex<Option<SandboxRecord>>,
    pub taken: Mutex<usize>,
}

impl super::WarmPool for FakePool {
    fn runtime(&self) -> RuntimeKind {
        self.runtime
    }

    fn take(&self, _req: &BootRequest, _cache_disks: &[std::path::PathBuf]) -> super::WarmClaim {
        *self.taken.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        match self.ready.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(record) => super::WarmClaim::Hit {
                note: Some(format!("took {} from the fake pool", record.name)),
                record: Box::new(record),
            },
            None => super::WarmClaim::Miss { note: "the fake pool is empty: booting one".into() },
        }
    }

    fn admits(&self, _running: usize) -> bool {
        true
    }

    fn budget_bytes(&self) -> u64 {
        0
    }

    fn set_running_jobs(&self, _n: usize) {}

    fn status_line(&self) -> String {
        "fake pool".into()
    }

    fn stop_booting(&self) -> usize {
        0
    }

    fn drain(&self) -> usize {
        0
    }
}
