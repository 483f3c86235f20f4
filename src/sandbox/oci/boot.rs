//! Booting a sandbox: the job's images resolved, its state directory and marker, its use
//! record in the image store, its cgroup, its own uid range with idmapped image mounts (uids.rs),
//! the workspace's reach (rootfs.rs) and, in network mode `internet`, its network. A failure
//! removes whatever was made.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::teardown::unmount_roots;
use super::{cgroup, rootfs, uids, OciDetails, OciImage, OciRuntime, MARKER, RESOLV_CONF};
use crate::image::{ID_BASE, ID_COUNT};
use crate::sandbox::{BootRequest, Limits, RecordDetails, Runtime, RuntimeKind, SandboxRecord};

impl OciRuntime {
    pub(super) fn boot_sandbox(&self, req: &BootRequest) -> Result<SandboxRecord> {
        let which = self.oci_runtime.as_str();
        which::which(which).with_context(|| format!("the OCI runtime {which} is not installed"))?;
        crate::sandbox::private_state_dir(&self.opts.state_dir)?;
        let store = self.store()?;
        // Every image first: an unknown image fails the job before anything is created.
        let mut images = BTreeMap::new();
        for r in &req.images {
            let img = store.resolve(r)?;
            images.insert(
                r.clone(),
                OciImage {
                    digest: img.digest,
                    rootfs: img.rootfs,
                    root: None,
                    env: img.env,
                    user: img.user,
                    workdir: img.workdir,
                },
            );
        }
        let name = format!("{}-{}", req.name_prefix, uuid::Uuid::new_v4().simple());
        let state_dir = self.opts.sandboxes_dir().join(&name);
        fs::create_dir_all(state_dir.join("runtime"))
            .with_context(|| format!("creating sandbox directory {}", state_dir.display()))?;
        let ws_md = fs::metadata(req.workspace)
            .with_context(|| format!("inspecting workspace {}", req.workspace.display()))?;
        let cg = cgroup::JobCgroup::new(&name);
        let limits = req.limits;
        let details = OciDetails {
            oci_runtime: which.to_string(),
            workspace: req.workspace.to_path_buf(),
            workspace_uid: ws_md.uid(),
            workspace_gid: ws_md.gid(),
            images: images.clone(),
            cgroup: cg.rel.clone(),
            tmp_bytes: if limits.disk_bytes > 0 { limits.disk_bytes.min(1 << 30) } else { 256 << 20 },
            max_file_bytes: limits.disk_bytes,
            workspace_disk_bytes: if crate::workspace::disk::is_mounted(req.workspace) {
                limits.disk_bytes
            } else {
                0
            },
            cpus: limits.cpus,
            uid_base: ID_BASE,
            network: None,
            caches: Vec::new(),
        };
        let mut record = SandboxRecord::new(RuntimeKind::Oci, name.clone(), state_dir.clone());
        details.store(&mut record);
        // The marker goes first, so that a crash from here on leaves something the janitor finds.
        crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
        let mut details = details;
        let setup = (|| -> Result<()> {
            let digests: Vec<String> = images.values().map(|i| i.digest.clone()).collect();
            store.add_user(&name, &digests)?;
            cg.create(&Limits { pids: if limits.pids > 0 { limits.pids } else { 4096 }, ..limits.clone() })?;
            if let Err(e) = self.map_ids(&name, &state_dir, &mut details) {
                tracing::warn!(
                    "sandbox {name} gets no uid range of its own ({e:#}): its container root is \
                     host uid {ID_BASE}, shared with every other job in the same case"
                );
            }
            details.store(&mut record);
            crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
            rootfs::make_reach(&name, req.workspace, details.uid_base)?;
            // The network last, recorded at once: a failure here fails the job before any
            // step runs (fail closed), and what was made is in the record for the teardown.
            if self.opts.network.mode != crate::network::Mode::None {
                let net = crate::network::setup(&self.opts.state_dir, &name, &self.opts.network, req.reach())
                    .context("setting up the job's network (EXECUTOR_NETWORK=internet)")?;
                let resolv = rootfs::reach_dir(&name).join(RESOLV_CONF);
                fs::write(&resolv, net.resolv_conf())
                    .with_context(|| format!("writing {}", resolv.display()))?;
                details.network = Some(net);
                details.store(&mut record);
                crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
            }
            // The workspace goes to the container's root with the first step (write_bundle), not
            // here: the loop boots this sandbox while the repository is still being cloned.
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = self.teardown(&record);
            return Err(e.context(format!("booting oci sandbox for job {}", req.job_uid)));
        }
        Ok(record)
    }

    /// Gives the sandbox a host uid range of its own (uids.rs) and an idmapped read-only mount
    /// of each image in it, where the image's files (stored owned by `ID_BASE + n`) belong to
    /// that range. On failure nothing of it is left and the sandbox keeps the shared range.
    fn map_ids(&self, name: &str, state_dir: &Path, d: &mut OciDetails) -> Result<()> {
        let ranges = uids::UidRanges::new(&self.opts.state_dir);
        let slot = ranges.allocate(name)?;
        let base = uids::base(slot);
        let res = (|| -> Result<BTreeMap<String, OciImage>> {
            let userns = crate::base::sys::userns_fd(ID_BASE, base, ID_COUNT)
                .context("making a user namespace for the idmapped image mounts")?;
            let mut images = d.images.clone();
            for img in images.values_mut() {
                let hex: String = img.digest.chars().filter(|c| c.is_ascii_hexdigit()).take(64).collect();
                let root = state_dir.join("roots").join(hex);
                if !root.exists() {
                    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
                    crate::base::sys::idmapped_bind(&img.rootfs, &root, &userns).with_context(|| {
                        format!("idmapped mount of {} on {}", img.rootfs.display(), root.display())
                    })?;
                }
                img.root = Some(root);
            }
            Ok(images)
        })();
        match res {
            Ok(images) => {
                d.images = images;
                d.uid_base = base;
                Ok(())
            }
            Err(e) => {
                unmount_roots(state_dir);
                ranges.release(name)?;
                Err(e)
            }
        }
    }
}
