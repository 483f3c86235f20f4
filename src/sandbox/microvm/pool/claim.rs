//! A job taking a pool VM: the VM must match the job's key, exact image set and workspace size; the
//! job's workspace filesystem is written in place into the VM's blank disk, and the agent,
//! told over the channel of the boot, mounts it.

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use super::super::{disk, MicroVm};
use super::super::{PoolClaim, VmDetails};
use super::{Claim, Member, Pool, PoolKey, OWNER_FILE};
use crate::guest::protocol::*;
use crate::sandbox::{BootRequest, RecordDetails, SandboxRecord};

/// How long the agent may take to mount the workspace.
const MOUNT_LIMIT: Duration = Duration::from_secs(30);

/// Writes the job's workspace filesystem (`mkfs.ext4 -d`) into the pool VM's disk file, in place:
/// the same inode QEMU holds open, truncated and re-extended to the same size (the guest's disk
/// cannot change size). The file lives in a directory that belongs to the VM's (unprivileged)
/// user, who could have replaced it with a symlink or a hard link to a file of root's: it is
/// opened without following a symlink, must be a regular file with one link and the size it was
/// made with, and `mkfs` (run as root) gets that open file (`/proc/self/fd/N`), never the path.
fn write_disk_in_place(workspace: &Path, disk: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(disk)
        .with_context(|| format!("opening the pool VM's disk {}", disk.display()))?;
    let md = f.metadata().with_context(|| format!("reading {}", disk.display()))?;
    if !md.is_file() || md.nlink() != 1 || md.len() != size {
        bail!(
            "{} is no longer the pool VM's disk (a regular file with one link of {size} bytes)",
            disk.display()
        );
    }
    f.set_len(0).and_then(|()| f.set_len(size)).with_context(|| format!("clearing {}", disk.display()))?;
    let dir = std::fs::File::open(workspace).with_context(|| format!("opening {}", workspace.display()))?;
    let mut cmd = crate::base::proc::command("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "workspace", "-E", "root_owner=0:0", "-O", "^has_journal", "-m", "0", "-d"])
        .arg(workspace)
        .arg(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // The disk's descriptor reaches mkfs only (cleared close-on-exec in the child alone).
    crate::base::sys::start_in_dir_keeping(&mut cmd, dir.as_raw_fd(), vec![f.as_raw_fd()]);
    let o = cmd.output().context("running mkfs.ext4 (install e2fsprogs)")?;
    if !o.status.success() {
        bail!(
            "mkfs.ext4 -d {} into {} failed: {}",
            workspace.display(),
            disk.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl Pool {
    pub(super) fn try_claim(&self, req: &BootRequest, caches: &[std::path::PathBuf]) -> Claim {
        // A ready VM's network was made for the pool's coordinator alone; a VM restored on the
        // job's path gets the job's own.
        let networked = self.rt.opts.network.mode != crate::network::Mode::None;
        let unreachable = if networked && req.coordinator != self.cfg.coordinator.as_deref() {
            Some("the job's coordinator is not the one the pool's VMs may reach".to_string())
        } else if networked && !req.endpoints.is_empty() {
            Some(format!(
                "the job's steps upload to {}, which the pool's VMs may not reach",
                req.endpoints.join(", ")
            ))
        } else {
            None
        };
        if *req.limits != self.cfg.limits {
            return Claim::Miss("the job's limits are not the pool's".into());
        }
        self.want(&req.images, caches);
        let base = match self.base_key() {
            Ok(b) => b,
            Err(e) => return Claim::Miss(format!("{e:#}")),
        };
        let images = self.resolve(&req.images);
        if images.len() != req.images.iter().collect::<HashSet<_>>().len() {
            return Claim::Miss("not every image of the job resolves in the image store".into());
        }
        let used = match disk::tree_bytes(req.workspace) {
            Ok(u) => u,
            Err(e) => return Claim::Miss(format!("{e:#}")),
        };
        if used + (64 << 20) > base.disk_bytes {
            return Claim::Miss(format!(
                "the workspace ({}) does not fit the pool's disks",
                crate::base::units::format_bytes(used)
            ));
        }
        if let Some(why) = unreachable {
            return self.restore_for_job(req, PoolKey { base, images, caches: caches.to_vec() }, why);
        }
        let mut member = {
            let mut st = self.state();
            let why: String = if st.ready.is_empty() {
                match st.making.len() {
                    0 => "no VM of the pool is ready".into(),
                    1 => "no VM of the pool is ready yet (one is booting)".into(),
                    n => format!("no VM of the pool is ready yet ({n} are being made)"),
                }
            } else {
                "no ready VM of the pool has the job's kernel, limits and exactly its images and cache disks"
                    .into()
            };
            let Some(i) = st.ready.iter().position(|m| m.key.serves(&base, &images, caches)) else {
                drop(st);
                return self.restore_for_job(req, PoolKey { base, images, caches: caches.to_vec() }, why);
            };
            if used + (64 << 20) > st.ready[i].key.base.disk_bytes {
                return Claim::Miss(format!(
                    "the workspace ({}) does not fit the pool's disks",
                    crate::base::units::format_bytes(used)
                ));
            }
            st.ready.remove(i)
        };
        match self.attach(&mut member, req.workspace) {
            Ok(claim) => Claim::Hit(Box::new(self.hand_over(member, claim))),
            Err(e) => {
                let why = format!("attaching the workspace to pool VM {} failed: {e:#}", member.rec.name);
                self.destroy(member);
                Claim::Miss(why)
            }
        }
    }

    /// The record of a VM a job took, with how it took it; the channel stays open for the job's
    /// first step.
    pub(super) fn hand_over(&self, mut member: Member, claim: PoolClaim) -> SandboxRecord {
        let mut rec = member.rec.clone();
        if let Ok(Some(mut det)) = VmDetails::of(&rec) {
            det.pool = Some(claim);
            det.store(&mut rec);
        }
        if let (Some(ch), Ok(det)) = (member.ch.take(), MicroVm::details(&rec)) {
            self.rt.keep_idle(&rec, &det.socket, ch);
        }
        rec
    }

    /// Writes the job's workspace filesystem into the VM's workspace disk (the same file QEMU
    /// holds open, rewritten in place) and has the agent mount it.
    pub(super) fn attach(&self, m: &mut Member, workspace: &Path) -> Result<PoolClaim> {
        let idle_ms = m.ready_at.elapsed().as_millis() as u64;
        // A job's VM from now on: the CPU weight of any VM.
        super::super::cgroup::Cgroup::set_cpu_weight(&m.rec.name, false);
        let det = MicroVm::details(&m.rec)?;
        let t = Instant::now();
        write_disk_in_place(workspace, &det.workspace_disk, det.workspace_disk_bytes)?;
        let disk_build_ms = t.elapsed().as_millis() as u64;
        // From now on the job's workspace owner record names this VM.
        std::fs::remove_file(m.rec.state_dir.join(OWNER_FILE))
            .with_context(|| format!("removing the pool owner of VM {}", m.rec.name))?;
        let t = Instant::now();
        let mut ch = match m.ch.take() {
            Some(ch) => ch,
            None => self.rt.connect(&m.rec)?,
        };
        let id = rand::random::<u32>() % (u32::MAX - 1);
        ch.send(&Frame::json(Kind::Mount, &Control { id })?)?;
        let until = Instant::now() + MOUNT_LIMIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the agent of VM {} did not mount the workspace within {MOUNT_LIMIT:?}", m.rec.name);
            }
            let Some(f) = ch.recv(left.min(Duration::from_millis(200)))? else { continue };
            match f.kind {
                Kind::Mounted if f.parse::<Control>()?.id == id => break,
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!("the agent of VM {}: {}", m.rec.name, super::super::printable(&r.message));
                    }
                }
                _ => {}
            }
        }
        m.ch = Some(ch);
        Ok(PoolClaim { idle_ms, disk_build_ms, mount_ms: t.elapsed().as_millis() as u64, on_demand_ms: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_is_written_in_place_and_never_through_a_link() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("f"), "job file").unwrap();
        let disk = d.path().join("workspace.ext4");
        let size = 64u64 << 20;
        std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
        let ino = std::fs::metadata(&disk).unwrap().ino();
        write_disk_in_place(&ws, &disk, size).unwrap();
        let md = std::fs::metadata(&disk).unwrap();
        assert_eq!((md.ino(), md.len()), (ino, size), "the same file, the same size");
        let head = std::fs::read(&disk).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xef], "an ext4 superblock");
        // A symlink or a second hard link in its place (the VM's user owns the directory).
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::remove_file(&disk).unwrap();
        std::os::unix::fs::symlink(&victim, &disk).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
        std::fs::remove_file(&disk).unwrap();
        std::fs::hard_link(&victim, &disk).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A size other than the one QEMU knows.
        std::fs::remove_file(&disk).unwrap();
        std::fs::File::create(&disk).unwrap().set_len(size / 2).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
    }
}
