//! The job's cgroup: one per sandbox, holding the job's memory, CPU and process limits, with
//! each step's container in a child below it. cgroup v1 (separate `memory`, `pids`, `cpu`
//! hierarchies, as on these machines) and v2 (one unified tree) are both handled. Its counters
//! tell which limit a step hit, and its process list reaches every process of the job.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

use crate::sandbox::Limits;

const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every job cgroup.
pub const PARENT: &str = "executor-oci";
/// v1 hierarchies where the job's cgroup is created and limits are set.
const V1_LIMITED: &[&str] = &["memory", "pids", "cpu"];

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    V1,
    V2,
}

pub fn layout() -> Layout {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Layout::V2
    } else {
        Layout::V1
    }
}

/// Counters of limit hits, read before and after a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub oom_kills: u64,
    pub pids_max: u64,
    /// Times memory usage reached the job's limit (v1 `memory.failcnt`; v2 `memory.events max`).
    pub mem_failcnt: u64,
    /// The most memory the job used (v1 `memory.max_usage_in_bytes`; v2 `memory.peak`).
    pub mem_peak: u64,
    /// The job's memory limit (0 for none).
    pub mem_limit: u64,
    /// Most processes the job had at once (0 where the kernel does not say).
    pub pids_peak: u64,
    /// The job's process limit (0 for none).
    pub pids_limit: u64,
    /// CFS periods the job ran in, and those in which its CPU quota throttled it.
    pub cpu_periods: u64,
    pub cpu_throttled: u64,
}

/// A job's cgroup, `executor-oci/<sandbox>` in each hierarchy.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    pub rel: String,
    layout: Layout,
}

impl JobCgroup {
    pub fn new(sandbox: &str) -> JobCgroup {
        JobCgroup { rel: format!("{PARENT}/{sandbox}"), layout: layout() }
    }

    /// `cgroupsPath` for a step's container.
    pub fn child_path(&self, container: &str) -> String {
        format!("/{}/{container}", self.rel)
    }

    fn dir(&self, controller: &str) -> PathBuf {
        match self.layout {
            Layout::V1 => Path::new(ROOT).join(controller).join(&self.rel),
            Layout::V2 => Path::new(ROOT).join(&self.rel),
        }
    }

    /// Creates the cgroup and writes the limits.
    pub fn create(&self, limits: &Limits) -> Result<()> {
        let period: u64 = 100_000;
        match self.layout {
            Layout::V1 => {
                for c in V1_LIMITED {
                    let d = self.dir(c);
                    fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
                }
                if limits.memory_bytes > 0 {
                    write(&self.dir("memory"), "memory.limit_in_bytes", limits.memory_bytes)?;
                    // No swap past the limit where the kernel accounts swap.
                    let memsw = self.dir("memory").join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&self.dir("memory"), "memory.memsw.limit_in_bytes", limits.memory_bytes)?;
                    }
                }
                if limits.pids > 0 {
                    write(&self.dir("pids"), "pids.max", limits.pids)?;
                }
                if limits.cpus > 0 {
                    write(&self.dir("cpu"), "cpu.cfs_period_us", period)?;
                    write(&self.dir("cpu"), "cpu.cfs_quota_us", period * u64::from(limits.cpus))?;
                }
            }
            Layout::V2 => {
                let parent = Path::new(ROOT).join(PARENT);
                fs::create_dir_all(&parent)
                    .with_context(|| format!("creating cgroup {}", parent.display()))?;
                for d in [Path::new(ROOT), parent.as_path()] {
                    let f = d.join("cgroup.subtree_control");
                    fs::write(&f, "+memory +pids +cpu")
                        .with_context(|| format!("enabling controllers in {}", f.display()))?;
                }
                let d = self.dir("");
                fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
                if limits.memory_bytes > 0 {
                    write(&d, "memory.max", limits.memory_bytes)?;
                    let _ = write(&d, "memory.swap.max", 0);
                }
                if limits.pids > 0 {
                    write(&d, "pids.max", limits.pids)?;
                }
                if limits.cpus > 0 {
                    let f = d.join("cpu.max");
                    fs::write(&f, format!("{} {period}", period * u64::from(limits.cpus)))
                        .with_context(|| format!("writing {}", f.display()))?;
                }
            }
        }
        Ok(())
    }

    /// The job's counters. On v1 the kernel counts fork failures and OOM kills in the step's
    /// own cgroup (see [`child_counters`](Self::child_counters)); the job's cgroup keeps
    /// `memory.failcnt` and `pids.peak`.
    pub fn counters(&self) -> Counters {
        self.counters_at(&self.rel)
    }

    /// The counters of a step's container cgroup while it exists.
    pub fn child_counters(&self, container: &str) -> Counters {
        self.counters_at(&format!("{}/{container}", self.rel))
    }

    fn counters_at(&self, rel: &str) -> Counters {
        let dir = |c: &str| match self.layout {
            Layout::V1 => Path::new(ROOT).join(c).join(rel),
            Layout::V2 => Path::new(ROOT).join(rel),
        };
        let read = |c: &str, file: &str, key: &str| -> u64 {
            fs::read_to_string(dir(c).join(file))
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())))
                .unwrap_or(0)
        };
        match self.layout {
            Layout::V1 => Counters {
                oom_kills: read("memory", "memory.oom_control", "oom_kill "),
                pids_max: read("pids", "pids.events", "max "),
                // With memory+swap limited to the same size, the kernel charges memsw first and
                // counts the failure there: both counters say the limit was reached.
                mem_failcnt: read("memory", "memory.failcnt", "")
                    + read("memory", "memory.memsw.failcnt", ""),
                mem_peak: read("memory", "memory.max_usage_in_bytes", ""),
                mem_limit: read("memory", "memory.limit_in_bytes", ""),
                pids_peak: read("pids", "pids.peak", ""),
                pids_limit: read("pids", "pids.max", ""),
                cpu_periods: read("cpu", "cpu.stat", "nr_periods "),
                cpu_throttled: read("cpu", "cpu.stat", "nr_throttled "),
            },
            Layout::V2 => Counters {
                oom_kills: read("", "memory.events", "oom_kill "),
                pids_max: read("", "pids.events", "max "),
                mem_failcnt: read("", "memory.events", "max "),
                mem_peak: read("", "memory.peak", ""),
                mem_limit: read("", "memory.max", ""),
                pids_peak: read("", "pids.peak", ""),
                pids_limit: read("", "pids.max", ""),
                cpu_periods: read("", "cpu.stat", "nr_periods "),
                cpu_throttled: read("", "cpu.stat", "nr_throttled "),
            },
        }
    }

    /// Every process in the job's cgroup and its children.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir("pids")];
        while let Some(d) = stack.pop() {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
        }
        out
    }

    /// SIGKILLs every process of the job, repeating until none is left (new forks included) or
    /// `rounds` passes were made. Returns whether the cgroup is empty.
    pub fn kill_all(&self, rounds: u32) -> bool {
        for _ in 0..rounds {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            for p in pids {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.pids().is_empty()
    }

    /// Removes the job's cgroup (children first) from every hierarchy it is in.
    pub fn remove(&self) -> Result<()> {
        let dirs: Vec<PathBuf> = match self.layout {
            Layout::V2 => vec![self.dir("")],
            Layout::V1 => fs::read_dir(ROOT)
                .map(|rd| rd.flatten().map(|e| e.path().join(&self.rel)).filter(|p| p.is_dir()).collect())
                .unwrap_or_default(),
        };
        for d in dirs {
            remove_tree(&d)?;
        }
        Ok(())
    }
}

/// rmdir a cgroup directory and its children, deepest first (cgroup files cannot be unlinked).
fn remove_tree(d: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while the kernel finishes reaping the last processes.
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("removing cgroup {}", d.display())),
        None => Ok(()),
    }
}

/// Names of job cgroups (sandbox names) that exist on this host.
pub fn existing_jobs() -> Vec<String> {
    let dir = match layout() {
        Layout::V1 => Path::new(ROOT).join("pids").join(PARENT),
        Layout::V2 => Path::new(ROOT).join(PARENT),
    };
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn write(dir: &Path, file: &str, value: u64) -> Result<()> {
    let p = dir.join(file);
    fs::write(&p, value.to_string()).with_context(|| format!("writing {value} to {}", p.display()))
}
