//! A template's RAM, shared copy-on-write by every VM restored from it, as Firecracker maps its
//! snapshots' memory: untouched pages cost nothing and the template's pages exist once.
//!
//! The template's guest RAM is a memfd of the executor's (`memory-backend-file,share=on` on
//! `/proc/self/fd/N`), so the template writes its memory into it, and its migration stream
//! leaves that RAM out (`x-ignore-shared`). Once the template quit, the memfd is sealed
//! (`F_SEAL_WRITE`, `F_SEAL_GROW`, `F_SEAL_SHRINK`, `F_SEAL_SEAL`): nobody can change it again,
//! and a VM restored from it maps it privately (`share=off`, `MAP_PRIVATE`): its writes are its
//! own pages, and a QEMU that tried to write into the file itself (a guest that took QEMU over)
//! would be refused by the seal. The RAM is kept on disk beside the stream (`ram`, sparse: its
//! non-zero pages only) and loaded into a fresh sealed memfd once per process, its checksum
//! checked while it loads: a VM never starts from RAM that is not what was saved.
//!
//! The checksum is over the non-zero pages and their offsets (SHA-256 of, for each such page in
//! order, its offset as 8 little-endian bytes then its 4096 bytes), so that it does not depend on
//! how a filesystem stores holes.

use anyhow::{Context, Result};
use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::unistd::{lseek, Whence};
use sha2::Digest;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::loaded::{Corrupt, Loaded};
use super::Snapshot;

/// The RAM's file in a snapshot's directory.
pub(crate) const RAM: &str = "ram";
const PAGE: usize = 4096;
/// How much is read at a time.
const CHUNK: usize = 1 << 20;

/// The sealed RAM of each snapshot this process restored from (or a corrupted verdict), by
/// snapshot id and checksum.
static LOADED: Loaded<Arc<OwnedFd>> = Loaded::new();

/// A fresh memfd of `size` bytes for a template's RAM.
pub(crate) fn template_ram(size: u64) -> Result<Arc<OwnedFd>> {
    let fd = memfd_create(
        c"executor-template-ram",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .context("making the template's RAM (memfd_create)")?;
    nix::unistd::ftruncate(&fd, size as i64).context("sizing the template's RAM")?;
    Ok(Arc::new(fd))
}

fn seal(fd: &OwnedFd) -> Result<()> {
    let seals =
        SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    nix::fcntl::fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).context("sealing the template's RAM")?;
    Ok(())
}

/// The data ranges of `f` (holes skipped), `[start, end)`.
fn data_ranges(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size {
        let start = match lseek(f.as_fd().as_raw_fd(), at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context("finding the RAM's data"),
        };
        let end = match lseek(f.as_fd().as_raw_fd(), start, Whence::SeekHole) {
            Ok(e) => e,
            Err(e) => return Err(e).context("finding the RAM's holes"),
        };
        out.push((start as u64, (end as u64).min(size)));
        at = end;
    }
    Ok(out)
}

/// Calls `page(offset, bytes)` for each non-zero page of `from` (`size` bytes), in order, and
/// returns how many there were and their checksum.
fn pages(from: &File, size: u64, mut page: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<(u64, String)> {
    let mut hash = sha2::Sha256::new();
    let mut count = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_ranges(from, size)? {
        let mut at = start - start % PAGE as u64;
        while at < end {
            let n = (CHUNK as u64).min(end.next_multiple_of(PAGE as u64) - at) as usize;
            from.read_exact_at(&mut buf[..n], at).context("reading the RAM")?;
            for (i, p) in buf[..n].chunks(PAGE).enumerate() {
                if p.iter().any(|b| *b != 0) {
                    let off = at + (i * PAGE) as u64;
                    hash.update(off.to_le_bytes());
                    hash.update(p);
                    count += 1;
                    page(off, p)?;
                }
            }
            at += n as u64;
        }
    }
    Ok((count * PAGE as u64, super::hex(&hash.finalize())))
}

/// After the template quit: seals its RAM and writes its non-zero pages to `out` (a sparse file
/// of the RAM's size, synced); returns their bytes and checksum.
pub(crate) fn save(ram: &OwnedFd, size: u64, out: &Path) -> Result<(u64, String)> {
    seal(ram)?;
    let from = File::from(ram.try_clone().context("duplicating the template's RAM")?);
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(size).with_context(|| format!("sizing {}", out.display()))?;
    let saved = pages(&from, size, |off, p| {
        f.write_all_at(p, off).with_context(|| format!("writing {}", out.display()))
    })?;
    f.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    Ok(saved)
}

/// The sealed RAM of `snap`, loaded from its file once per process with its checksum checked.
pub(crate) fn load(snap: &Snapshot) -> Result<Arc<OwnedFd>> {
    LOADED.get(&snap.id, &snap.meta.ram_sha256, || {
        let path = snap.dir.join(RAM);
        let from = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let size = from.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        let fd = template_ram(size)?;
        let to = File::from(fd.try_clone().context("duplicating a snapshot's RAM")?);
        let (bytes, sum) =
            pages(&from, size, |off, p| to.write_all_at(p, off).context("filling a snapshot's RAM"))?;
        if (bytes, sum.as_str()) != (snap.meta.ram_bytes, snap.meta.ram_sha256.as_str()) {
            return Err(Corrupt {
                id: snap.id.clone(),
                what: format!(
                    "its RAM has {bytes} bytes of SHA-256 {sum} where {} bytes of {} were saved",
                    snap.meta.ram_bytes, snap.meta.ram_sha256
                ),
            }
            .into());
        }
        seal(&fd)?;
        Ok(fd)
    })
}

/// Keeps a just-saved template's sealed RAM as snapshot `id`'s, so that this process's restores
/// need not load it back from the file it was written to.
pub(crate) fn remember(id: &str, sha256: &str, fd: Arc<OwnedFd>) {
    LOADED.remember(id, sha256, fd);
}

/// Drops the loaded RAM of snapshot `id` (removed: VMs already restored keep their mapping).
pub(crate) fn forget(id: &str) {
    LOADED.forget(id);
}

/// A memfd's bytes in use, for tests.
#[cfg(test)]
fn read_all(fd: &OwnedFd, size: u64) -> Vec<u8> {
    let f = File::from(fd.try_clone().unwrap());
    let mut v = vec![0u8; size as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_ram_loads_back_sealed_and_a_changed_page_is_caught() {
        let size = 64 * PAGE as u64;
        let ram = template_ram(size).unwrap();
        let w = File::from(ram.try_clone().unwrap());
        w.write_all_at(&[7u8; PAGE], 3 * PAGE as u64).unwrap();
        w.write_all_at(b"tail", size - 4).unwrap();
        // A page written with zeros is no data.
        w.write_all_at(&[0u8; PAGE], 10 * PAGE as u64).unwrap();
        let d = tempfile::tempdir().unwrap();
        let (bytes, sum) = save(&ram, size, &d.path().join(RAM)).unwrap();
        assert_eq!(bytes, 2 * PAGE as u64);
        assert!(w.write_all_at(b"x", 0).is_err(), "sealed: nobody writes the template's RAM again");
        let meta = |bytes, sum: &str| super::super::Meta {
            key: "k".into(),
            kernel: String::new(),
            initramfs: String::new(),
            images: vec![],
            qemu: String::new(),
            bytes: 0,
            sha256: String::new(),
            image_disks: vec![],
            boot_ms: 0,
            save_ms: 0,
            ram_bytes: bytes,
            ram_sha256: sum.into(),
        };
        let snap = Snapshot { id: "t1".into(), dir: d.path().into(), meta: meta(bytes, &sum) };
        let fd = load(&snap).unwrap();
        assert_eq!(read_all(&fd, size), read_all(&ram, size));
        assert!(File::from(fd.try_clone().unwrap()).write_all_at(b"x", 0).is_err());
        assert!(Arc::ptr_eq(&fd, &load(&snap).unwrap()), "loaded once per process");
        forget("t1");
        // One byte changed on disk: not loaded.
        File::options()
            .write(true)
            .open(d.path().join(RAM))
            .unwrap()
            .write_all_at(b"\x08", 3 * PAGE as u64)
            .unwrap();
        let e = load(&snap).unwrap_err();
        assert!(e.downcast_ref::<Corrupt>().is_some(), "{e:#}");
    }
}
