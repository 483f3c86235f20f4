//! The workspace coming back from a VM: the agent sends /data as a tar, bounded by the size of
//! the workspace disk, and the host unpacks it as hostile input, as it streams in.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{printable, MicroVm, SILENCE_LIMIT};
use crate::guest::protocol::*;
use crate::sandbox::SandboxRecord;

impl MicroVm {
    /// Copies the VM's /data back into the host's workspace: the agent sends it as a tar, which
    /// is unpacked as it streams in (nothing of it is buffered on the host) and refused past the
    /// size of the VM's workspace disk.
    pub(super) fn fetch_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        unpack_workspace(self.sync_stream(sandbox, false)?, workspace)
    }

    /// Asks the agent for the tar of /data (or of its cache layers only), as a stream bounded by
    /// the size of the VM's workspace disk.
    pub(super) fn sync_stream(&self, sandbox: &SandboxRecord, caches_only: bool) -> Result<SyncStream> {
        let det = Self::details(sandbox)?;
        let limit = det.workspace_disk_bytes.max(64 << 20);
        let mut ch = self.connect(sandbox)?;
        let id = rand::random::<u32>() % (u32::MAX - 1);
        ch.send(&Frame::json(Kind::Sync, &SyncRequest { id, caches_only })?)?;
        Ok(SyncStream {
            ch,
            id,
            vm: sandbox.name.clone(),
            buf: Vec::new(),
            at: 0,
            total: 0,
            limit,
            last_seen: Instant::now(),
            ended: false,
        })
    }
}

/// The agent's `SyncData` frames of one request as a byte stream, ending at its `SyncEnd`; an
/// error past `limit` bytes, after `SILENCE_LIMIT` of silence, or on the agent's error.
pub(super) struct SyncStream {
    ch: super::channel::Channel,
    id: u32,
    vm: String,
    buf: Vec<u8>,
    at: usize,
    total: u64,
    limit: u64,
    last_seen: Instant,
    ended: bool,
}

impl SyncStream {
    fn fill(&mut self) -> Result<()> {
        while self.at >= self.buf.len() && !self.ended {
            if self.last_seen.elapsed() > SILENCE_LIMIT {
                bail!(
                    "the agent of VM {} was silent for {SILENCE_LIMIT:?} while sending the workspace",
                    self.vm
                );
            }
            let Some(f) = self.ch.recv(Duration::from_millis(200))? else { continue };
            match f.kind {
                Kind::SyncData => {
                    let (fid, data) = f.split_data()?;
                    if fid != self.id {
                        continue;
                    }
                    self.last_seen = Instant::now();
                    self.total += data.len() as u64;
                    if self.total > self.limit {
                        bail!(
                            "VM {} sent more than {} bytes of workspace (the size of its disk)",
                            self.vm,
                            self.limit
                        );
                    }
                    self.buf = data.to_vec();
                    self.at = 0;
                }
                Kind::SyncEnd => {
                    let end: SyncEnd = f.parse()?;
                    if end.id == self.id {
                        self.ended = true;
                    }
                }
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == self.id {
                        bail!(
                            "the agent of VM {} could not send the workspace: {}",
                            self.vm,
                            printable(&r.message)
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl std::io::Read for SyncStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.fill().map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Replaces the workspace's contents with the tar the guest sent. The tar is hostile: only
/// regular files, directories and symlinks are taken (no device nodes, no FIFOs), each through
/// `unpack_in`, which refuses paths that leave the workspace (`..`, absolute, or through a
/// symlink), and their modes lose setuid, setgid and sticky bits.
pub fn unpack_workspace(tar: impl std::io::Read, workspace: &Path) -> Result<()> {
    for e in fs::read_dir(workspace).with_context(|| format!("listing {}", workspace.display()))?.flatten() {
        let p = e.path();
        let res = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.with_context(|| format!("clearing {}", p.display()))?;
    }
    unpack_entries(tar, workspace, false)
}

/// Replaces the workspace's cache layers (`.executor-cache-*` at its top) with the tar of them
/// the guest sent, as hostile as the workspace's (`unpack_workspace`); an entry outside a cache
/// layer is refused.
pub(crate) fn unpack_cache_layers(tar: impl std::io::Read, workspace: &Path) -> Result<()> {
    for e in fs::read_dir(workspace).with_context(|| format!("listing {}", workspace.display()))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(CACHE_LAYER_PREFIX) {
            crate::base::fs::remove_any(&e.path())?;
        }
    }
    unpack_entries(tar, workspace, true)
}

fn unpack_entries(tar: impl std::io::Read, workspace: &Path, layers_only: bool) -> Result<()> {
    let mut ar = tar::Archive::new(tar);
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
        if layers_only && !path.starts_with(CACHE_LAYER_PREFIX) {
            bail!("the VM's cache layers hold {path:?}, which is not in one");
        }
        let inside = entry.unpack_in(workspace).with_context(|| format!("unpacking {path} from the VM"))?;
        if !inside {
            bail!("the VM's workspace holds {path:?}, which leaves the workspace");
        }
        if layers_only {
            // A cache keeps the guest's owners: in the image store's id range, as the guest's
            // own id n is the store's ID_BASE + n (an id beyond the range is root's).
            let h = entry.header();
            let id = |v: std::io::Result<u64>| {
                let n = v.unwrap_or(0);
                crate::image::ID_BASE + if n < crate::image::ID_COUNT as u64 { n as u32 } else { 0 }
            };
            let dest = workspace.join(path.trim_end_matches('/'));
            std::os::unix::fs::lchown(&dest, Some(id(h.uid())), Some(id(h.gid())))
                .with_context(|| format!("setting the owner of {path} from the VM"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of `tar` sent by a stand-in agent in 1 KiB frames, with a frame of another
    /// request in between, then its end.
    fn stream_of(tar: Vec<u8>, limit: u64) -> (SyncStream, std::thread::JoinHandle<()>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("agent.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            Frame::data(Kind::SyncData, 9, b"another request's bytes").write_to(&mut c).unwrap();
            for chunk in tar.chunks(1024) {
                if Frame::data(Kind::SyncData, 7, chunk).write_to(&mut c).is_err() {
                    return;
                }
            }
            let _ = Frame::json(Kind::SyncEnd, &SyncEnd { id: 7, bytes: 0 }).unwrap().write_to(&mut c);
        });
        let ch = super::super::channel::Channel::connect(&sock, Duration::from_secs(5)).unwrap();
        let s = SyncStream {
            ch,
            id: 7,
            vm: "vm-1".into(),
            buf: Vec::new(),
            at: 0,
            total: 0,
            limit,
            last_seen: Instant::now(),
            ended: false,
        };
        (s, agent, d)
    }

    fn tar_of(files: &[(&str, usize)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, size) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*size as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &vec![b'x'; *size][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// The cache layers a guest sends replace the workspace's and nothing else: the rest of the
    /// workspace stays, and an entry outside a layer is refused.
    #[test]
    fn cache_layers_replace_only_themselves() {
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir_all(ws.path().join(".executor-cache-0/upper")).unwrap();
        fs::write(ws.path().join(".executor-cache-0/upper/stale"), "s").unwrap();
        fs::write(ws.path().join("kept.txt"), "k").unwrap();
        let tar = tar_of(&[(".executor-cache-0/upper/pkg", 3), (".executor-cache-0/upper/.wh.gone", 0)]);
        unpack_cache_layers(&tar[..], ws.path()).unwrap();
        assert!(!ws.path().join(".executor-cache-0/upper/stale").exists());
        assert_eq!(fs::read(ws.path().join(".executor-cache-0/upper/pkg")).unwrap(), b"xxx");
        assert!(ws.path().join(".executor-cache-0/upper/.wh.gone").is_file());
        assert!(ws.path().join("kept.txt").exists());
        // The guest's owners, in the image store's range (one beyond the guest's ids: root).
        use std::os::unix::fs::MetadataExt;
        let owner = |p: &str| {
            let md = fs::symlink_metadata(ws.path().join(p)).unwrap();
            (md.uid() - crate::image::ID_BASE, md.gid() - crate::image::ID_BASE)
        };
        assert_eq!(owner(".executor-cache-0/upper/pkg"), (0, 0));
        if nix::unistd::geteuid().is_root() {
            let mut b = tar::Builder::new(Vec::new());
            for (name, uid, gid) in
                [(".executor-cache-2/upper/n", 1000, 1001), (".executor-cache-2/upper/m", 1 << 20, 7)]
            {
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                h.set_mode(0o644);
                h.set_uid(uid);
                h.set_gid(gid);
                h.set_cksum();
                b.append_data(&mut h, name, &b"x"[..]).unwrap();
            }
            unpack_cache_layers(&b.into_inner().unwrap()[..], ws.path()).unwrap();
            assert_eq!(owner(".executor-cache-2/upper/n"), (1000, 1001));
            assert_eq!(owner(".executor-cache-2/upper/m"), (0, 7));
        }
        let tar = tar_of(&[(".executor-cache-1/upper/a", 1), ("src/evil.sh", 1)]);
        let err = unpack_cache_layers(&tar[..], ws.path()).unwrap_err();
        assert!(format!("{err:#}").contains("which is not in one"), "{err:#}");
        assert!(!ws.path().join("src").exists());
    }

    /// Low finding of issue 24: the workspace tar was buffered on the host up to twice the disk
    /// size. It is unpacked as its frames arrive, and refused past the disk's size.
    #[test]
    fn the_workspace_streams_in_and_stops_at_the_disk_size() {
        let tar = tar_of(&[("a.txt", 3000), ("dir/b.txt", 10)]);
        let (s, agent, _d) = stream_of(tar.clone(), tar.len() as u64);
        let ws = tempfile::tempdir().unwrap();
        unpack_workspace(s, ws.path()).unwrap();
        agent.join().unwrap();
        assert_eq!(fs::read(ws.path().join("a.txt")).unwrap().len(), 3000);
        assert_eq!(fs::read_to_string(ws.path().join("dir/b.txt")).unwrap(), "x".repeat(10));
        // One byte over the disk's size: refused while streaming.
        let (s, agent, _d) = stream_of(tar_of(&[("big", 64 << 10)]), 32 << 10);
        let ws = tempfile::tempdir().unwrap();
        let e = format!("{:#}", unpack_workspace(s, ws.path()).unwrap_err());
        assert!(e.contains("sent more than 32768 bytes of workspace"), "{e}");
        drop(agent);
    }

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
