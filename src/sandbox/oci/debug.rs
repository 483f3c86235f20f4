//! Keeping a failed job's sandbox and attaching to it (`executor debug`, see sandbox/kept.rs).
//!
//! Kept: the failed step's writable layer (step.rs keeps it as `.executor-kept` at the top of the
//! workspace when `EXECUTOR_KEEP_FAILED` is on), the workspace, the image mounts, the job's cgroup
//! and uid range; every process is killed and the job's network removed. An attach is a fresh
//! container of the failed step's image, user and working directory with the kept layer as its
//! writable root, the workspace at `/data`, a network namespace of its own with loopback only,
//! and the step's environment less secrets, under the job's limits: what the step left, as it
//! left it. One attach at a time (the overlay's upper layer cannot be shared).

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use super::ahead::drop_prepared;
use super::{cgroup, rootfs, spec, OciDetails, OciRuntime, MARKER};
use crate::sandbox::kept::KeptStep;
use crate::sandbox::{RecordDetails, SandboxRecord};

/// Held while someone is attached to the sandbox.
const ATTACH_LOCK: &str = "debug.lock";

impl OciRuntime {
    pub(super) fn keep_sandbox(&self, sandbox: &SandboxRecord) -> Result<SandboxRecord> {
        drop_prepared(&sandbox.name);
        let mut d = Self::details(sandbox)?;
        if !d.workspace.join(rootfs::KEPT_LAYER).is_dir() {
            bail!("sandbox {} has no failed step's layer to keep", sandbox.name);
        }
        let cg = cgroup::JobCgroup::new(&sandbox.name);
        cg.kill_all(100);
        self.delete_containers(&d.oci_runtime, &sandbox.state_dir);
        rootfs::remove_step_roots(&sandbox.name, &d.workspace);
        // Network none from here on: the job's namespace, veth and rules go now.
        if let Some(net) = d.network.take() {
            crate::network::teardown(&self.opts.state_dir, &net)
                .with_context(|| format!("removing the network of kept sandbox {}", sandbox.name))?;
        }
        let mut record = sandbox.clone();
        d.store(&mut record);
        crate::base::fs::write_atomic(&sandbox.state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
        Ok(record)
    }

    pub(super) fn attach_debug(
        &self,
        sandbox: &SandboxRecord,
        step: &KeptStep,
        command: Option<&str>,
        tty: bool,
    ) -> Result<i32> {
        let d: OciDetails = Self::details(sandbox)?;
        if !sandbox.state_dir.join(MARKER).exists() {
            bail!("kept sandbox {} is gone", sandbox.name);
        }
        if d.network.is_some() {
            bail!("sandbox {} still has its network: it was not kept", sandbox.name);
        }
        let _held = crate::base::lock::try_lock(&sandbox.state_dir.join(ATTACH_LOCK))?
            .with_context(|| format!("someone is attached to sandbox {} already", sandbox.name))?;
        Self::shift_workspace(&sandbox.state_dir, &d)?;
        let image = d
            .images
            .get(&step.image)
            .with_context(|| format!("kept sandbox {} has no image {:?}", sandbox.name, step.image))?;
        let lower = image.root.clone().unwrap_or_else(|| image.rootfs.clone());
        let user = crate::image::runas::resolve(&lower, &image.user)
            .with_context(|| format!("step {} in image {:?}", step.key, step.image))?;
        let mut env = crate::image::runas::environment(&image.env, &step.env, spec::DEFAULT_PATH, &user.home);
        if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let id = format!("{}-debug{}", sandbox.name, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let root = rootfs::mount_kept(&sandbox.name, &d.workspace, &lower, &id)?;
        let bundle = sandbox.state_dir.join("bundles").join(&id);
        let cg = cgroup::JobCgroup::new(&sandbox.name);
        let res = (|| -> Result<i32> {
            fs::create_dir_all(&bundle).with_context(|| format!("creating bundle {}", bundle.display()))?;
            let dir = step.dir.trim_matches('/');
            if dir.split('/').any(|c| c == "..") {
                bail!("step directory {:?} is not inside the workspace", step.dir);
            }
            // The job's dependency caches at their paths, as the failed step saw them (the kept
            // sandbox still holds their leases).
            let (caches, cache_masks) = super::caches::step_mounts(&d.caches);
            let container = spec::StepContainer {
                rootfs: root.path.clone(),
                readonly_root: false,
                mask: Some(root.mask.clone()),
                uid: user.uid,
                gid: user.gid,
                groups: user.groups.clone(),
                id_base: d.uid_base,
                workspace: rootfs::reach_workspace(&sandbox.name),
                cwd: if dir.is_empty() { "/data".into() } else { format!("/data/{dir}") },
                args: match command {
                    Some(c) => vec!["/bin/sh".into(), "-c".into(), c.into()],
                    None => vec!["/bin/sh".into()],
                },
                env,
                cgroups_path: cg.child_path(&id),
                tmp_bytes: d.tmp_bytes,
                max_file_bytes: d.max_file_bytes,
                max_open_files: 1024,
                caches,
                cache_masks,
            };
            // No network: a namespace of its own with loopback only.
            let mut config = spec::bundle_config(&container, None);
            config["process"]["terminal"] = serde_json::Value::Bool(tty);
            fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config)?)
                .with_context(|| format!("writing {}", bundle.join("config.json").display()))?;
            let mut cmd = self.runtime_cmd(&d.oci_runtime, &sandbox.state_dir);
            cmd.arg("run").arg("--bundle").arg(&bundle).arg(&id);
            cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
            cmd.env_clear().env("PATH", spec::DEFAULT_PATH);
            let status = cmd.status().with_context(|| format!("starting {}", d.oci_runtime))?;
            Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        })();
        // Whatever the shell left running goes with it; the kept layer stays.
        cg.kill_all(50);
        let mut del = self.runtime_cmd(&d.oci_runtime, &sandbox.state_dir);
        del.args(["delete", "--force", &id]);
        let _ = self.quiet(del);
        let _ = fs::remove_dir_all(&bundle);
        rootfs::unmount_kept(&root);
        res
    }
}
