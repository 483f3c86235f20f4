//! Who owns a pool VM: its `pool-owner` file names the executor, whose pool lock
//! (`sandboxes/pool-<executor>.lock`) is held while it lives, so that a janitor leaves the VMs of
//! a live executor and reclaims those of one that was killed.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::Pool;

/// The file in a pool VM's sandbox directory naming the executor that owns it (removed when a
/// job takes the VM: the job's workspace owner record names it from then on).
pub(crate) const OWNER_FILE: &str = "pool-owner";

pub(super) fn lock_path(sandboxes: &Path, owner: &str) -> PathBuf {
    let safe: String = owner
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    sandboxes.join(format!("pool-{safe}.lock"))
}

/// The names of pool VMs (in `sandboxes`) whose owning executor still lives (holds its pool
/// lock): the janitor leaves them. The VMs of an executor that is gone are not listed, so the
/// janitor reclaims them like any VM no job owns; the dead executor's lock file goes too.
pub(crate) fn live_members(sandboxes: &Path) -> Result<HashSet<String>> {
    let mut live = HashSet::new();
    let rd = match std::fs::read_dir(sandboxes) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(live),
        Err(e) => return Err(e).with_context(|| format!("listing {}", sandboxes.display())),
    };
    let mut gone: Vec<(String, crate::base::lock::Held)> = Vec::new();
    let mut alive: HashSet<String> = HashSet::new();
    for e in rd.flatten() {
        let Some(owner) = read_owner_file(&e.path().join(OWNER_FILE)) else { continue };
        let owner = owner.trim().to_string();
        if alive.contains(&owner) {
            live.insert(e.file_name().to_string_lossy().into_owned());
            continue;
        }
        if gone.iter().any(|(o, _)| *o == owner) {
            continue;
        }
        match crate::base::lock::try_lock(&lock_path(sandboxes, &owner))? {
            Some(held) => gone.push((owner, held)),
            None => {
                alive.insert(owner);
                live.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    for (owner, _held) in gone {
        let _ = std::fs::remove_file(lock_path(sandboxes, &owner));
    }
    Ok(live)
}

/// A pool VM's owner file: at most 256 bytes, never through a symlink (the directory belongs to
/// the VM's user).
fn read_owner_file(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(256).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

impl Pool {
    /// Creates the sandbox directory of pool VM `name` with its owner file, under the janitor
    /// lock: a janitor pass sees either no directory or an owned one (the lock is not held for
    /// the boot itself, which would hold every janitor pass for seconds).
    pub(super) fn own(&self, name: &str) -> Result<()> {
        let _held = crate::workspace::janitor_lock(&self.rt.opts.state_dir, false)?;
        let dir = self.rt.opts.sandboxes_dir().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(OWNER_FILE), &self.cfg.owner)
            .with_context(|| format!("writing the pool owner of VM {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_members_keeps_a_live_owners_vms_and_gives_up_a_dead_ones() {
        let d = tempfile::tempdir().unwrap();
        let held = crate::base::lock::try_lock(&lock_path(d.path(), "alive")).unwrap().unwrap();
        for (vm, owner) in [("vm-a", "alive"), ("vm-b", "dead"), ("vm-c", "alive")] {
            std::fs::create_dir_all(d.path().join(vm)).unwrap();
            std::fs::write(d.path().join(vm).join(OWNER_FILE), owner).unwrap();
        }
        std::fs::create_dir_all(d.path().join("vm-job")).unwrap();
        std::fs::write(lock_path(d.path(), "dead"), "").unwrap();
        let live = live_members(d.path()).unwrap();
        assert_eq!(live, ["vm-a", "vm-c"].iter().map(|s| s.to_string()).collect());
        assert!(!lock_path(d.path(), "dead").exists(), "a dead owner's lock file goes");
        drop(held);
        assert!(live_members(d.path()).unwrap().is_empty());
    }
}
