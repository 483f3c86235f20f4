//! The workspace coming back from a VM: the agent sends /data as a tar, bounded by the size of
//! the workspace disk, and the host unpacks it as hostile input.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{printable, MicroVm, SILENCE_LIMIT};
use crate::guest::protocol::*;
use crate::sandbox::SandboxRecord;

impl MicroVm {
    /// Copies the VM's /data back into the host's workspace (the agent sends it as a tar).
    pub(super) fn fetch_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        let det = Self::details(sandbox)?;
        let limit = det.workspace_disk_bytes.max(64 << 20) * 2;
        let mut ch = self.connect(sandbox)?;
        let id = rand::random::<u32>() % (u32::MAX - 1);
        ch.send(&Frame::json(Kind::Sync, &Control { id })?)?;
        let mut tarfile = tempfile::tempfile_in(&sandbox.state_dir)
            .with_context(|| format!("creating a temporary file in {}", sandbox.state_dir.display()))?;
        let mut total = 0u64;
        let mut last_seen = Instant::now();
        loop {
            if last_seen.elapsed() > SILENCE_LIMIT {
                bail!(
                    "the agent of VM {} was silent for {SILENCE_LIMIT:?} while sending the workspace",
                    sandbox.name
                );
            }
            let Some(f) = ch.recv(Duration::from_millis(200))? else { continue };
            match f.kind {
                Kind::SyncData => {
                    let (fid, data) = f.split_data()?;
                    if fid != id {
                        continue;
                    }
                    last_seen = Instant::now();
                    total += data.len() as u64;
                    if total > limit {
                        bail!("VM {} sent more than {limit} bytes of workspace", sandbox.name);
                    }
                    std::io::Write::write_all(&mut tarfile, data).context("buffering the workspace")?;
                }
                Kind::SyncEnd => {
                    let end: SyncEnd = f.parse()?;
                    if end.id == id {
                        break;
                    }
                }
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!(
                            "the agent of VM {} could not send the workspace: {}",
                            sandbox.name,
                            printable(&r.message)
                        );
                    }
                }
                _ => {}
            }
        }
        std::io::Seek::rewind(&mut tarfile).context("rewinding the workspace tar")?;
        unpack_workspace(tarfile, workspace)
    }
}

/// Replaces the workspace's contents with the tar the guest sent. The tar is hostile: only
/// regular files, directories and symlinks are taken (no device nodes, no FIFOs), each through
/// `unpack_in`, which refuses paths that leave the workspace (`..`, absolute, or through a
/// symlink), and their modes lose setuid, setgid and sticky bits.
pub fn unpack_workspace(tarfile: fs::File, workspace: &Path) -> Result<()> {
    for e in fs::read_dir(workspace).with_context(|| format!("listing {}", workspace.display()))?.flatten() {
        let p = e.path();
        let res = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.with_context(|| format!("clearing {}", p.display()))?;
    }
    let mut ar = tar::Archive::new(tarfile);
    ar.set_preserve_permissions(true);
    // Modes come back without setuid, setgid or sticky bits: the guest's root made these files,
    // and on the host they are root's.
    ar.set_mask(0o7000);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar.entries().context("reading the workspace tar from the VM")? {
        let mut entry = entry.context("reading the workspace tar from the VM")?;
        let t = entry.header().entry_type();
        if !(t.is_file() || t.is_dir() || t.is_symlink()) {
            continue;
        }
        let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let inside = entry.unpack_in(workspace).with_context(|| format!("unpacking {path} from the VM"))?;
        if !inside {
            bail!("the VM's workspace holds {path:?}, which leaves the workspace");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 8 of the security review: the workspace copied back from a guest kept setuid and
    /// setgid bits on what are, on the host, root-owned files.
    #[test]
    fn workspace_from_a_guest_loses_special_modes_and_devices() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, data).unwrap();
        };
        add("suid", tar::EntryType::Regular, 0o4755, b"#!/bin/sh\n");
        add("sgid-dir", tar::EntryType::Directory, 0o3775, b"");
        add("sgid-dir/f", tar::EntryType::Regular, 0o2777, b"x");
        add("null", tar::EntryType::Char, 0o666, b"");
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let ws = tempfile::tempdir().unwrap();
        unpack_workspace(f, ws.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| fs::symlink_metadata(ws.path().join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid-dir"), 0o775);
        assert_eq!(mode("sgid-dir/f"), 0o777);
        assert!(!ws.path().join("null").exists(), "no device node comes back");
    }

    #[test]
    fn hostile_workspace_tar_cannot_escape() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("old"), "x").unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", outside.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "link/evil", &b"evil"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let res = unpack_workspace(f, ws.path());
        assert!(res.is_err() || !outside.path().join("evil").exists());
        assert!(!outside.path().join("evil").exists());
        assert!(!ws.path().join("old").exists());
    }
}
