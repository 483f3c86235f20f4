//! One host uid/gid range per sandbox: slot `k` (1 and up) is host ids
//! `ID_BASE + k * ID_COUNT ..` + `ID_COUNT`, so the container roots of two jobs running at once
//! are different unprivileged host users, and one job's processes can never own or signal
//! another's. Slots are files `uid-ranges/<k>` in the state directory naming their sandbox,
//! taken and given back under an exclusive `flock` on `uid-ranges/.lock`; the janitor reclaims
//! the slots of sandboxes that no longer exist. Slot 0 (`ID_BASE` itself) is the range the image
//! store keeps its trees in; containers see them through an idmapped mount of their own range.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

use crate::image::{ID_BASE, ID_COUNT};

/// How many job ranges there are: ids stay below 2^32 - 2^16 (u32, and clear of `(uid_t)-1`).
pub(crate) const SLOTS: u32 = ((u32::MAX - ID_BASE) / ID_COUNT) - 1;

/// The first host id of slot `k`.
pub(crate) fn base(slot: u32) -> u32 {
    ID_BASE + slot * ID_COUNT
}

/// The slots of one state directory.
pub(crate) struct UidRanges {
    dir: PathBuf,
}

impl UidRanges {
    pub(crate) fn new(state_dir: &Path) -> UidRanges {
        UidRanges { dir: state_dir.join("uid-ranges") }
    }

    fn lock(&self) -> Result<crate::base::lock::Held> {
        crate::base::lock::lock(&self.dir.join(".lock"), true)
    }

    /// Takes the lowest free slot for `sandbox`.
    pub(crate) fn allocate(&self, sandbox: &str) -> Result<u32> {
        let _lock = self.lock()?;
        for k in 1..=SLOTS {
            let p = self.dir.join(k.to_string());
            if p.exists() {
                continue;
            }
            crate::base::fs::write_atomic(&p, sandbox.as_bytes())?;
            return Ok(k);
        }
        bail!("all {SLOTS} uid ranges in {} are taken", self.dir.display())
    }

    /// Gives back the slot of `sandbox`, if it holds one.
    pub(crate) fn release(&self, sandbox: &str) -> Result<()> {
        let _lock = self.lock()?;
        for (k, owner) in self.slots()? {
            if owner == sandbox {
                let p = self.dir.join(k.to_string());
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Every taken slot and the sandbox that holds it.
    pub(crate) fn slots(&self) -> Result<Vec<(u32, String)>> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let Some(k) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let owner = fs::read_to_string(e.path()).unwrap_or_default();
            out.push((k, owner.trim().to_string()));
        }
        out.sort();
        Ok(out)
    }

    /// Frees the slots whose sandbox `gone` says no longer exists; returns the freed sandboxes.
    pub(crate) fn reclaim(&self, gone: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let _lock = self.lock()?;
        let mut freed = Vec::new();
        for (k, owner) in self.slots()? {
            if gone(&owner) {
                let p = self.dir.join(k.to_string());
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                freed.push(owner);
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_reused_and_reclaimed() {
        let d = tempfile::tempdir().unwrap();
        let r = UidRanges::new(d.path());
        let a = r.allocate("sb-a").unwrap();
        let b = r.allocate("sb-b").unwrap();
        assert_eq!((a, b), (1, 2));
        assert!(base(b) >= base(a) + ID_COUNT, "ranges overlap");
        assert_eq!(base(0), ID_BASE);
        assert!(u64::from(base(SLOTS)) + u64::from(ID_COUNT) < u64::from(u32::MAX));
        r.release("sb-a").unwrap();
        assert_eq!(r.allocate("sb-c").unwrap(), 1, "a released slot is taken again");
        let freed = r.reclaim(|s| s == "sb-b").unwrap();
        assert_eq!(freed, vec!["sb-b".to_string()]);
        assert_eq!(r.slots().unwrap(), vec![(1, "sb-c".to_string())]);
    }

    #[test]
    fn concurrent_allocations_never_share_a_slot() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || UidRanges::new(&dir).allocate(&format!("sb-{i}")).unwrap())
            })
            .collect();
        let mut got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort();
        assert_eq!(got, (1..=8).collect::<Vec<_>>());
    }
}
