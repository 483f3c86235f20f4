//! Steps made ahead: a step's container created by a shim (shim.rs) while the workspace may
//! still be filling, so that running the step only starts it
//! ([`crate::sandbox::Runtime::prepare_step`]).

use anyhow::{Context, Result};
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{rootfs, OciRuntime, KILL_GRACE};
use crate::sandbox::{SandboxRecord, StepSpec};

/// A step's container made ahead ([`Runtime::prepare_step`]): created by a shim (shim.rs) that
/// waits for the byte that starts it.
pub(super) struct Prepared {
    pub(super) sandbox: String,
    /// What the bundle was written for: the step's key, image, script, directory and variables.
    pub(super) step: String,
    pub(super) id: String,
    pub(super) bundle: PathBuf,
    pub(super) root: rootfs::StepRoot,
    pub(super) shim: std::process::Child,
}

/// The containers made ahead in this process, until their step takes them or their sandbox goes.
static PREPARED: std::sync::Mutex<Vec<Prepared>> = std::sync::Mutex::new(Vec::new());

pub(super) fn prepared() -> std::sync::MutexGuard<'static, Vec<Prepared>> {
    PREPARED.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a prepared container must match to run `step` (hashed: the variables may hold secrets).
pub(super) fn step_fingerprint(step: &StepSpec) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{:?}", (step.key, step.image, step.script, step.dir, step.env))))
}

/// Drops the containers made ahead for `sandbox`: each shim, its input closed, deletes its
/// unstarted container and exits; one that does not within the grace period is killed. Their
/// roots and bundles go with the sandbox's.
pub(super) fn drop_prepared(sandbox: &str) {
    let mine: Vec<Prepared> = {
        let mut all = prepared();
        let (mine, rest) = std::mem::take(&mut *all).into_iter().partition(|p| p.sandbox == sandbox);
        *all = rest;
        mine
    };
    for p in mine {
        p.discard();
    }
}

impl Prepared {
    /// Closes the shim's input (it deletes its unstarted container and exits), kills it if it
    /// has not exited within the grace period, and removes the step's root and bundle.
    pub(super) fn discard(mut self) {
        drop(self.shim.stdin.take());
        let start = Instant::now();
        while !matches!(self.shim.try_wait(), Ok(Some(_))) {
            if start.elapsed() > KILL_GRACE {
                let _ = self.shim.kill();
                let _ = self.shim.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = rootfs::unmount_step(&self.root);
        let _ = fs::remove_dir_all(&self.bundle);
    }
}

impl OciRuntime {
    pub(super) fn make_ahead(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Result<bool> {
        let d = Self::details(sandbox)?;
        let which = d.oci_runtime.as_str();
        if which == "runsc" {
            return Ok(false);
        }
        Self::open_workspace_top(&sandbox.state_dir, &d)?;
        let (id, bundle, root) = Self::write_bundle_unshifted(sandbox, &d, step)?;
        let shim = self
            .shim_cmd(which, &sandbox.state_dir, &bundle, &id)
            .spawn()
            .with_context(|| format!("starting the shim of step {}", step.key));
        match shim {
            Ok(shim) => {
                prepared().push(Prepared {
                    sandbox: sandbox.name.clone(),
                    step: step_fingerprint(step),
                    id,
                    bundle,
                    root,
                    shim,
                });
                Ok(true)
            }
            Err(e) => {
                let _ = rootfs::unmount_step(&root);
                let _ = fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }
}
