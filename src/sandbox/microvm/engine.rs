//! `cliSteps` on the microVM runtime, as Sourcegraph's Firecracker executors run them: the VM
//! gets the guest's container engine (`executor install vm --engine`) and `src` (`executor
//! install src-cli`) as two more read-only disks, beside the disks of the step images the batch
//! spec names, which the host pulled through the image store; each cliStep runs as
//! `src <command…>` in the engine's root (guest/engine.rs), the images loaded into the engine
//! first, so the guest needs no registry.

use anyhow::{Context, Result};

use super::requests::inside_data;
use super::{ImageDisk, MicroVm};
use crate::base::cancel::Cancel;
use crate::guest::protocol::{EngineImage, EngineSetup, RunRequest};
use crate::sandbox::{BootRequest, CliStepSpec, OutputSink, SandboxRecord, StepEnd};

/// The references the engine's and src's disks are recorded under (no image has a space).
pub(super) const ENGINE_DISK: &str = "executor engine";
pub(super) const SRC_DISK: &str = "executor src-cli";

/// An image reference as Docker names it in full (`alpine:3.19` is
/// `docker.io/library/alpine:3.19`), which the guest's engine loads it under.
pub(crate) fn docker_name(reference: &str) -> String {
    let (name, rest) = match reference.find(['@']) {
        Some(i) => (&reference[..i], &reference[i..]),
        None => {
            let slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
            match reference[slash..].rfind(':') {
                Some(i) => (&reference[..slash + i], &reference[slash + i..]),
                None => (reference, ":latest"),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry = name.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    let full = if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{rest}")
}

impl MicroVm {
    /// The engine's and src's disks, or why a cliSteps job cannot run here.
    pub(super) fn engine_disks(&self) -> Result<Vec<ImageDisk>> {
        let engine = crate::vm::engine::installed(&self.opts.state_dir)?;
        let src = crate::vm::src_cli::installed(&self.opts.state_dir)?;
        Ok(vec![
            ImageDisk { reference: ENGINE_DISK.into(), digest: engine.inputs, disk: engine.disk },
            ImageDisk { reference: SRC_DISK.into(), digest: src.sha256, disk: src.disk },
        ])
    }

    /// What `cli_steps` checked, one line each.
    pub(super) fn cli_steps_check(&self) -> Result<Vec<String>> {
        let engine = crate::vm::engine::installed(&self.opts.state_dir)?;
        let src = crate::vm::src_cli::installed(&self.opts.state_dir)?;
        let version = if src.version.is_empty() { "version unknown".to_string() } else { src.version };
        Ok(vec![
            format!("guest container engine: {} ({})", engine.podman, engine.disk.display()),
            format!("src-cli {version}: {}", src.binary.display()),
        ])
    }

    /// Boots the VM of a cliSteps job: the step images' disks, then the engine's and src's.
    pub(super) fn boot_cli(&self, req: &BootRequest) -> Result<SandboxRecord> {
        let extra = self.engine_disks()?;
        self.boot_job(req, extra)
    }

    /// Runs `src <args>` in the engine's root of the VM, after loading the step images.
    pub(super) fn run_cli(
        &self,
        sandbox: &SandboxRecord,
        step: &CliStepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        let det = Self::details(sandbox)?;
        let index =
            |name: &str| {
                det.images.iter().position(|i| i.reference == name).map(|i| i as u32).with_context(|| {
                    format!("VM {} has no {name} disk (not booted for cliSteps)", sandbox.name)
                })
            };
        let (engine, src) = (index(ENGINE_DISK)?, index(SRC_DISK)?);
        let store = crate::image::ImageStore::open(&self.opts.images_dir())?;
        let mut images = Vec::new();
        for (i, d) in det.images.iter().enumerate() {
            if d.reference == ENGINE_DISK || d.reference == SRC_DISK {
                continue;
            }
            let img = store.resolve(&d.reference)?;
            images.push(EngineImage {
                disk: i as u32,
                names: vec![docker_name(&d.reference)],
                env: img.env,
                workdir: img.workdir,
                user: img.user,
            });
        }
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "HOME=/root".to_string(),
        ];
        env.extend(step.env.iter().cloned());
        let mut argv = vec!["src".to_string()];
        argv.extend(step.args.iter().cloned());
        let req = RunRequest {
            id: rand::random::<u32>() % (u32::MAX - 1),
            image: engine,
            argv,
            cwd: inside_data(step.dir)?,
            env,
            user: None,
            engine: Some(EngineSetup { upper: vec![src], images }),
            ..RunRequest::default()
        };
        self.request(sandbox, req, sink, cancel).with_context(|| format!("running step {}", step.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_docker_s_full_names() {
        assert_eq!(docker_name("alpine:3.19"), "docker.io/library/alpine:3.19");
        assert_eq!(docker_name("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(docker_name("sourcegraph/src-cli:5.2"), "docker.io/sourcegraph/src-cli:5.2");
        assert_eq!(docker_name("127.0.0.1:5000/busybox:1"), "127.0.0.1:5000/busybox:1");
        assert_eq!(docker_name("ghcr.io/a/b"), "ghcr.io/a/b:latest");
        assert_eq!(docker_name("localhost/x:1"), "localhost/x:1");
        let pinned = format!("node@sha256:{}", "a".repeat(64));
        assert_eq!(docker_name(&pinned), format!("docker.io/library/{pinned}"));
    }
}
