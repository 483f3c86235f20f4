//! Sandboxes kept after a failed job for `executor debug JOB` (`EXECUTOR_KEEP_FAILED`): the
//! registry of what is kept (one JSON file per job under `<state dir>/kept/`, mode 0600, no
//! secret in it), the caps on how many and how much disk (the oldest released first), and the
//! release that tears a kept sandbox down with its workspace: by the janitor when its time is up,
//! by the coordinator's word through the heartbeat, at the loop's shutdown, or for the cap.
//!
//! A kept sandbox is still its runtime's: its record (the marker in its state directory) and its
//! uid range, cgroup and image mounts stay reserved, so no other job gets any of them; its network
//! is gone and nothing of it runs until someone attaches.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{RuntimeOptions, SandboxRecord};

/// The registry's directory under the state directory.
const DIR: &str = "kept";

/// The failed step whose state a debug shell enters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptStep {
    pub key: String,
    pub image: String,
    /// Working directory relative to the workspace.
    pub dir: String,
    /// The step's `NAME=value` environment less every variable whose value holds a secret.
    pub env: Vec<String>,
}

/// One kept sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptSandbox {
    /// `"<id>"` or `"<id>-<queue>"`.
    pub job_uid: String,
    pub job_id: i64,
    pub queue: String,
    /// The executor (its heartbeat name) that ran the job.
    pub executor: String,
    /// The coordinator, where each attach is recorded in the job's log.
    pub frontend_url: String,
    pub kept_at: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub sandbox: SandboxRecord,
    pub workspace: PathBuf,
    pub step: KeptStep,
    /// The disk it holds (its workspace with the failed step's layer), measured when kept.
    pub disk_bytes: u64,
}

impl KeptSandbox {
    /// The command that attaches to it on its host.
    pub fn command(&self) -> String {
        format!("executor debug {}", self.job_uid)
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

fn file(state_dir: &Path, job_uid: &str) -> PathBuf {
    dir(state_dir).join(format!("{job_uid}.json"))
}

/// Every kept sandbox of this state directory, oldest first. An unreadable entry is skipped.
pub fn list(state_dir: &Path) -> Vec<KeptSandbox> {
    let mut out: Vec<KeptSandbox> = std::fs::read_dir(dir(state_dir))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|k: &KeptSandbox| k.kept_at);
    out
}

/// Records `k` as kept.
pub fn save(state_dir: &Path, k: &KeptSandbox) -> Result<()> {
    if k.job_uid.is_empty() || k.job_uid.contains(['/', '\0']) || k.job_uid.starts_with('.') {
        anyhow::bail!("job uid {:?} cannot name a kept sandbox", k.job_uid);
    }
    let d = dir(state_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    crate::base::fs::write_atomic(&file(state_dir, &k.job_uid), &serde_json::to_vec_pretty(k)?)
}

/// The kept sandbox of `job` (its uid, or its id when only one kept job has it).
pub fn find(state_dir: &Path, job: &str) -> Result<KeptSandbox> {
    let all = list(state_dir);
    if let Some(k) = all.iter().find(|k| k.job_uid == job) {
        return Ok(k.clone());
    }
    let by_id: Vec<&KeptSandbox> = all.iter().filter(|k| k.job_id.to_string() == job).collect();
    match by_id.as_slice() {
        [k] => Ok((*k).clone()),
        [] => anyhow::bail!(
            "no sandbox is kept for job {job} on this host (`executor debug --list` shows what is)"
        ),
        many => anyhow::bail!(
            "job id {job} is kept from several queues: name one of {}",
            many.iter().map(|k| k.job_uid.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Tears `k` down (its sandbox by its runtime, then its workspace) and forgets it. The entry goes
/// last, so that a release that failed is tried again by the next janitor pass.
pub fn release(opts: &RuntimeOptions, k: &KeptSandbox) -> Result<()> {
    let rt = super::open(k.sandbox.runtime, opts)?;
    rt.teardown(&k.sandbox).with_context(|| format!("releasing the kept sandbox of job {}", k.job_uid))?;
    if k.workspace.exists() {
        crate::workspace::remove(&k.workspace)
            .with_context(|| format!("removing the kept workspace of job {}", k.job_uid))?;
    }
    match std::fs::remove_file(file(&opts.state_dir, &k.job_uid)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("forgetting the kept sandbox of job {}", k.job_uid))
        }
        _ => Ok(()),
    }
}

/// How many of the oldest of `kept` (oldest first, each its disk) must go so that the rest and
/// `adding` more bytes fit `max_count` sandboxes (counting the one added when `adding` is
/// `Some`) and `max_bytes`.
pub fn over_caps(kept: &[u64], adding: Option<u64>, max_count: usize, max_bytes: u64) -> usize {
    let extra = usize::from(adding.is_some());
    let mut total: u64 = kept.iter().sum::<u64>() + adding.unwrap_or(0);
    let mut drop = 0;
    while drop < kept.len() && (kept.len() - drop + extra > max_count || total > max_bytes) {
        total -= kept[drop];
        drop += 1;
    }
    drop
}

/// What a janitor pass did with the kept sandboxes.
#[derive(Debug, Default)]
pub struct Swept {
    /// Lines saying what was released and why.
    pub released: Vec<String>,
    /// The job uids still kept: their workspaces and sandboxes are owned.
    pub live: HashSet<String>,
}

/// Releases the kept sandboxes whose time is up, whose workspace is gone, that `release` names
/// (by job uid: the coordinator asked) or that the caps no longer allow; returns what it did and
/// what stays kept.
pub fn sweep(
    opts: &RuntimeOptions,
    now: DateTime<Utc>,
    release_uids: &HashSet<String>,
    max_count: usize,
    max_bytes: u64,
) -> Swept {
    let mut out = Swept::default();
    let mut keep = Vec::new();
    for k in list(&opts.state_dir) {
        let why = if k.until <= now {
            Some("its time is up")
        } else if release_uids.contains(&k.job_uid) {
            Some("the coordinator released it")
        } else if !k.workspace.exists() {
            Some("its workspace is gone")
        } else {
            None
        };
        match why {
            Some(why) => out.released.push(release_line(opts, &k, why)),
            None => keep.push(k),
        }
    }
    let sizes: Vec<u64> = keep.iter().map(|k| k.disk_bytes).collect();
    let drop = over_caps(&sizes, None, max_count, max_bytes);
    for k in keep.drain(..drop) {
        out.released.push(release_line(opts, &k, "over EXECUTOR_KEEP_FAILED_MAX or _DISK"));
    }
    out.live = keep.into_iter().map(|k| k.job_uid).collect();
    out
}

fn release_line(opts: &RuntimeOptions, k: &KeptSandbox, why: &str) -> String {
    match release(opts, k) {
        Ok(()) => format!("kept sandbox of job {} ({why})", k.job_uid),
        Err(e) => format!("kept sandbox of job {} ({why}): release failed: {e:#}", k.job_uid),
    }
}

/// Releases every kept sandbox that `executor` kept (the loop's shutdown); returns what it did.
pub fn release_all(opts: &RuntimeOptions, executor: &str) -> Vec<String> {
    list(&opts.state_dir)
        .iter()
        .filter(|k| k.executor == executor)
        .map(|k| release_line(opts, k, "the executor stops"))
        .collect()
}

/// The disk a tree holds (allocated blocks, one filesystem, no link followed).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(path) else { return 0 };
    let mut total = top.blocks() * 512;
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.dev() != top.dev() {
                continue;
            }
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// `env` less every variable whose value holds a secret (`is_secret` says).
pub fn less_secrets(env: &[String], is_secret: impl Fn(&str) -> bool) -> Vec<String> {
    env.iter().filter(|e| !is_secret(e.split_once('=').map_or(e.as_str(), |(_, v)| v))).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::RuntimeKind;

    fn kept(uid: &str, at: i64, until: i64, ws: &Path, bytes: u64) -> KeptSandbox {
        let t = |s| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        KeptSandbox {
            job_uid: uid.into(),
            job_id: uid.split('-').next().unwrap().parse().unwrap(),
            queue: "q".into(),
            executor: "h".into(),
            frontend_url: "http://127.0.0.1:1".into(),
            kept_at: t(at),
            until: t(until),
            sandbox: SandboxRecord::new(RuntimeKind::Shell, format!("sb-{uid}"), ws.join("sb")),
            workspace: ws.to_path_buf(),
            step: KeptStep { key: "step.0".into(), image: "i".into(), dir: "".into(), env: vec![] },
            disk_bytes: bytes,
        }
    }

    #[test]
    fn caps_release_the_oldest_first() {
        assert_eq!(over_caps(&[1, 1, 1], Some(1), 3, 100), 1, "a fourth needs room");
        assert_eq!(over_caps(&[1, 1], Some(1), 3, 100), 0);
        assert_eq!(over_caps(&[50, 10, 10], Some(40), 9, 70), 1, "the oldest frees the disk");
        assert_eq!(over_caps(&[50, 10, 10], Some(40), 9, 50), 2);
        assert_eq!(over_caps(&[5, 5], None, 1, 100), 1);
        assert_eq!(over_caps(&[], Some(10), 0, 100), 0, "nothing to drop; the caller refuses");
    }

    #[test]
    fn registry_finds_by_uid_or_id_and_sweeps_what_is_due() {
        let d = tempfile::tempdir().unwrap();
        let opts =
            RuntimeOptions { state_dir: d.path().into(), allow_unisolated: true, ..Default::default() };
        let ws = |n: &str| {
            let p = d.path().join("ws").join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let now = Utc::now().timestamp();
        save(d.path(), &kept("7", now - 30, now + 600, &ws("7"), 10)).unwrap();
        save(d.path(), &kept("8-a", now - 20, now - 1, &ws("8-a"), 10)).unwrap();
        save(d.path(), &kept("8-b", now - 10, now + 600, &ws("8-b"), 10)).unwrap();
        save(d.path(), &kept("9", now - 5, now + 600, &ws("9"), 10)).unwrap();
        assert_eq!(find(d.path(), "7").unwrap().job_uid, "7");
        assert_eq!(find(d.path(), "8-b").unwrap().job_uid, "8-b");
        let e = format!("{:#}", find(d.path(), "8").unwrap_err());
        assert!(e.contains("8-a, 8-b"), "{e}");
        assert!(format!("{:#}", find(d.path(), "10").unwrap_err()).contains("no sandbox is kept for job 10"));
        let release: HashSet<String> = ["9".to_string()].into();
        let s = sweep(&opts, Utc::now(), &release, 1, 1 << 30);
        assert_eq!(s.live, HashSet::from(["8-b".to_string()]), "{:?}", s.released);
        let lines = s.released.join("\n");
        assert!(lines.contains("job 8-a (its time is up)"), "{lines}");
        assert!(lines.contains("job 9 (the coordinator released it)"), "{lines}");
        assert!(lines.contains("job 7 (over EXECUTOR_KEEP_FAILED_MAX"), "the oldest goes: {lines}");
        assert_eq!(list(d.path()).len(), 1);
        assert!(!ws("x").with_file_name("7").exists(), "a released sandbox's workspace goes with it");
        assert!(ws("x").with_file_name("8-b").exists());
        assert!(release_all(&opts, "other").is_empty());
        assert_eq!(release_all(&opts, "h").len(), 1);
        assert!(list(d.path()).is_empty());
    }

    #[test]
    fn secrets_leave_the_environment() {
        let env = vec!["A=1".to_string(), "TOKEN=xx-hunter2-yy".into(), "B=hunter".into()];
        assert_eq!(less_secrets(&env, |v| v.contains("hunter2")), ["A=1", "B=hunter"]);
    }
}
