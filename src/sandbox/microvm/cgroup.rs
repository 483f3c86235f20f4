//! QEMU's own cgroup, with memory, process and CPU limits: v1 controllers where they are
//! mounted separately (these machines), the unified v2 hierarchy otherwise.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// Where VM cgroups are made: the unified hierarchy's, then each v1 controller's.
const PARENTS: [&str; 5] =
    ["executor", "memory/executor", "pids/executor", "cpu/executor", "cpu,cpuacct/executor"];

/// The directories made for one VM, to put QEMU in and to remove afterwards.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cgroup {
    pub dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

impl Cgroup {
    /// Creates `executor/<name>` with the limits; `Ok(None)` where no cgroup is writable.
    pub(crate) fn create(name: &str, memory_bytes: u64, pids: u64, cpus: u32) -> Result<Option<Cgroup>> {
        let root = Path::new(ROOT);
        let v2 = root.join("cgroup.controllers").is_file();
        let mut cg = Cgroup::default();
        if v2 {
            let dir = root.join("executor").join(name);
            if fs::create_dir_all(&dir).is_err() {
                return Ok(None);
            }
            let _ = fs::write(root.join("executor/cgroup.subtree_control"), "+memory +pids +cpu");
            cg.dirs.push(dir.clone());
            write(&dir.join("memory.max"), &memory_bytes.to_string())?;
            write(&dir.join("pids.max"), &pids.to_string())?;
            write(&dir.join("cpu.max"), &format!("{} 100000", u64::from(cpus) * 100_000))?;
            return Ok(Some(cg));
        }
        for ctrl in ["memory", "pids", "cpu"] {
            let base = root.join(ctrl);
            if !base.join("tasks").is_file() {
                continue;
            }
            let dir = base.join("executor").join(name);
            if fs::create_dir_all(&dir).is_err() {
                continue;
            }
            cg.dirs.push(dir.clone());
            match ctrl {
                "memory" => write(&dir.join("memory.limit_in_bytes"), &memory_bytes.to_string())?,
                "pids" => write(&dir.join("pids.max"), &pids.to_string())?,
                _ => {
                    write(&dir.join("cpu.cfs_period_us"), "100000")?;
                    write(&dir.join("cpu.cfs_quota_us"), &(u64::from(cpus) * 100_000).to_string())?;
                }
            }
        }
        Ok(if cg.dirs.is_empty() { None } else { Some(cg) })
    }

    pub(crate) fn add(&self, pid: i32) -> Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Sets the CPU weight of the VM named `name` against the other VMs: `low` for a VM booted
    /// ahead of demand (its boot takes no CPU a job's VM wants), back to the default when a job
    /// takes it. v2 `cpu.weight` (default 100), v1 `cpu.shares` (default 1024); nothing where the
    /// VM has no cpu cgroup.
    pub(crate) fn set_cpu_weight(name: &str, low: bool) {
        let root = Path::new(ROOT);
        let v2 = root.join("executor").join(name).join("cpu.weight");
        if v2.is_file() {
            let _ = fs::write(v2, if low { "10" } else { "100" });
        }
        for sub in ["cpu/executor", "cpu,cpuacct/executor"] {
            let v1 = root.join(sub).join(name).join("cpu.shares");
            if v1.is_file() {
                let _ = fs::write(v1, if low { "128" } else { "1024" });
            }
        }
    }

    /// Removes the directories of the VM named `name` (they must be empty of processes; a
    /// process just killed may take a moment to leave, so a busy directory is tried again for up
    /// to a second).
    pub(crate) fn remove(name: &str) {
        let root = Path::new(ROOT);
        for sub in PARENTS {
            let dir = root.join(sub).join(name);
            for _ in 0..50 {
                match fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }

    /// Removes the empty cgroups `executor/<prefix>...` of every controller that `keep` does not
    /// claim (a cgroup with a process in it stays: the kernel refuses); returns their names.
    pub(crate) fn sweep_empty(prefix: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
        Self::sweep_empty_in(Path::new(ROOT), prefix, keep)
    }

    fn sweep_empty_in(root: &Path, prefix: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        for sub in PARENTS {
            let Ok(rd) = fs::read_dir(root.join(sub)) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with(prefix) || keep(&name) || !e.path().is_dir() {
                    continue;
                }
                if fs::remove_dir(e.path()).is_ok() && !removed.contains(&name) {
                    removed.push(name);
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_only_empty_unclaimed_cgroups_of_its_prefix() {
        let d = tempfile::tempdir().unwrap();
        for dir in ["executor/vm-a", "memory/executor/vm-a", "executor/vm-live", "executor/other-b"] {
            fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        // Not empty: a plain directory with a file stands in for a cgroup with a process.
        fs::create_dir_all(d.path().join("pids/executor/vm-busy/x")).unwrap();
        let removed = Cgroup::sweep_empty_in(d.path(), "vm-", |n| n == "vm-live");
        assert_eq!(removed, ["vm-a"]);
        assert!(!d.path().join("memory/executor/vm-a").exists());
        assert!(d.path().join("executor/vm-live").exists() && d.path().join("executor/other-b").exists());
        assert!(d.path().join("pids/executor/vm-busy").exists());
    }
}
