//! The janitor: removes this state directory's sandboxes (and what a crash left of them: cgroups,
//! uid ranges, networks, image store use records) whose names carry the prefix and that no live
//! job owns.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs;

use super::{cgroup, uids, OciRuntime, MARKER};
use crate::sandbox::{Runtime, RuntimeKind, SandboxRecord};

impl OciRuntime {
    pub(super) fn sweep(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let dir = self.opts.sandboxes_dir();
        let owned = |n: &str| n.starts_with(&format!("{prefix}-")) && !live.contains(n);
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let marker = e.path().join(MARKER);
                if !owned(&name) || !marker.exists() {
                    continue;
                }
                let record: SandboxRecord =
                    match fs::read(&marker).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                        Some(r) => r,
                        None => SandboxRecord::new(RuntimeKind::Oci, name.clone(), e.path()),
                    };
                self.teardown(&record).with_context(|| format!("removing stale sandbox {name}"))?;
                removed.push(name);
            }
        }
        // Cgroups of sandboxes of this state directory that lost their marker (a crash between
        // the steps of boot or teardown). The cgroup hierarchy is host-wide: a cgroup with no
        // directory here belongs to another executor (or another state directory) and is left
        // alone, whatever its name.
        let stale: Vec<String> = cgroup::existing_jobs()
            .into_iter()
            .filter(|n| owned(n) && !removed.contains(n) && dir.join(n).exists())
            .collect();
        for name in stale {
            let cg = cgroup::JobCgroup::new(&name);
            cg.kill_all(100);
            cg.remove()?;
            removed.push(name);
        }
        // uid ranges of sandboxes of this state directory that are gone.
        let freed =
            uids::UidRanges::new(&self.opts.state_dir).reclaim(|n| owned(n) && !dir.join(n).exists())?;
        for name in freed {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        // Networks whose sandbox record is gone or never named them (killed during setup).
        for name in crate::network::janitor(&self.opts.state_dir, owned)? {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        let store = self.store()?;
        for name in store.users()?.into_iter().filter(|n| owned(n)) {
            store.remove_user(&name)?;
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}
