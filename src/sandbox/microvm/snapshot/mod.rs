//! Snapshots of pool VMs: one template per pool key ([`PoolKey`]), booted once to the point
//! where its agent waits for a job, saved with QEMU's migration stream, and every further VM of
//! that key restored from it (`-incoming`) instead of booted: under TCG a restore takes a few
//! hundred milliseconds where a boot takes seconds.
//!
//! A snapshot is a directory `vm/snapshots/<key id>/` with the stream (`state`: the devices'
//! state), the template's RAM (`ram`, ram.rs) and what it is (`meta.json`: the key, QEMU's
//! version, the stream's and the RAM's sizes and SHA-256). Both are read once per process and
//! checked before a restoring QEMU starts (feed.rs, ram.rs, loaded.rs): QEMU never starts a
//! guest from a corrupted file; the restore fails, the snapshot is removed and the VM boots
//! cold, and the job's start entry says why (every VM restored from it at once says the same).
//!
//! Guest RAM is not in the stream: the template's RAM is a memfd of the executor's, sealed once
//! the template quit, and every restored VM maps it copy-on-write (`memory-backend-file`,
//! `share=off`, `x-ignore-shared` on both ends of the migration; ram.rs). QEMU 7.2 opens such a
//! file read-write (its `readonly=on` would map the guest's RAM read-only, and `rom=` came in
//! 8.2): the seal is what keeps a VM's QEMU from writing into the template all later VMs start
//! from.
//!
//! Each restored VM is made its own before it takes a job: the template boots with
//! `executor.template=1`, whose agent refuses any job until the host's `Reseed` (fresh host
//! entropy and a CRNG reseed, the host's clock, a new machine id; guest/identity.rs). Its
//! workspace disk is a fresh blank file and its job's filesystem is written into it when a job
//! takes it (pool/claim.rs), as for a booted pool VM.
//!
//! Kept: at most [`KEEP`] snapshots, least recently used removed first; the janitor removes
//! those whose kernel, initramfs, QEMU or images are no longer the installed ones, and the pool
//! those of a key it moved away from.

mod feed;
mod loaded;
mod qmp;
pub(crate) mod ram;
mod save;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub(super) use feed::{feed, stream};
pub(crate) use qmp::{ignore_shared, Qmp};
pub(crate) use save::save;

/// How many snapshots (one per key) are kept.
pub(crate) const KEEP: usize = 4;
pub(crate) const STATE: &str = "state";
const META: &str = "meta.json";

/// What a snapshot is, as `meta.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    /// The whole pool key, as text: a snapshot serves exactly this key.
    pub key: String,
    pub kernel: String,
    pub initramfs: String,
    /// (reference, digest) of its image disks.
    pub images: Vec<(String, String)>,
    /// `qemu-system-x86_64 --version`, first line: a stream is read only by the QEMU that wrote it.
    pub qemu: String,
    pub bytes: u64,
    pub sha256: String,
    /// The image disk files the template had open ([`disk_id`]): the guest's page cache holds
    /// blocks of them, so a restore needs the very same files.
    pub image_disks: Vec<String>,
    /// Booting and saving the template.
    pub boot_ms: u64,
    pub save_ms: u64,
    /// The template's RAM (ram.rs): its non-zero pages' bytes and checksum. A snapshot without
    /// them (an older executor's, whose stream held the RAM) is not restored.
    #[serde(default)]
    pub ram_bytes: u64,
    #[serde(default)]
    pub ram_sha256: String,
}

/// A snapshot on disk.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub id: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Snapshot {
    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }
}

pub(crate) fn snapshots_dir(state_dir: &Path) -> PathBuf {
    crate::vm::vm_dir(state_dir).join("snapshots")
}

/// What a snapshot is of: the pool key as text (compared whole) and the parts the janitor
/// judges (the pool makes it from its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub text: String,
    pub kernel: String,
    pub initramfs: String,
    /// (reference, digest) of its image disks.
    pub images: Vec<(String, String)>,
}

/// A key's directory name: the first 16 hex digits of the SHA-256 of its text.
pub(crate) fn key_id(key: &Key) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.text.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The first line of `qemu-system-x86_64 --version`, asked once per process.
pub(crate) fn qemu_version() -> Result<String> {
    static V: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let o = crate::base::proc::command(super::QEMU)
            .arg("--version")
            .output()
            .map_err(|e| format!("running {} --version: {e}", super::QEMU))?;
        let text = String::from_utf8_lossy(&o.stdout);
        text.lines()
            .next()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .ok_or_else(|| format!("{} --version said nothing", super::QEMU))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The snapshot of `key`, if one was saved by this QEMU; a directory that is not a whole
/// snapshot (no meta, another key, a stream of another size) is removed.
pub(crate) fn find(state_dir: &Path, key: &Key) -> Result<Option<Snapshot>> {
    let id = key_id(key);
    let dir = snapshots_dir(state_dir).join(&id);
    let Some(meta) = read_meta(&dir) else {
        if dir.exists() {
            remove_dir(&dir);
        }
        return Ok(None);
    };
    let len = std::fs::metadata(dir.join(STATE)).map(|m| m.len()).ok();
    let ram = meta.ram_sha256.is_empty() || !dir.join(ram::RAM).is_file();
    if meta.key != key.text || len != Some(meta.bytes) || meta.qemu != qemu_version()? || ram {
        tracing::info!("removing snapshot {id}: not the current key's, QEMU's or whole");
        remove_dir(&dir);
        return Ok(None);
    }
    touch(&dir);
    Ok(Some(Snapshot { id, dir, meta }))
}

fn read_meta(dir: &Path) -> Option<Meta> {
    serde_json::from_slice(&std::fs::read(dir.join(META)).ok()?).ok()
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// Marks a snapshot used now (its directory's mtime orders the least recently used).
fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Drops what this process kept of snapshot `id`'s stream and RAM.
fn forget(id: &str) {
    ram::forget(id);
    feed::forget(id);
}

/// Removes the snapshot of `key` (a restore from it failed, or the pool moved to another key).
pub(crate) fn remove(state_dir: &Path, key: &Key) {
    let id = key_id(key);
    forget(&id);
    remove_dir(&snapshots_dir(state_dir).join(id));
}

/// The snapshots on disk: (id, directory, meta or none, last use), oldest use first.
fn list(state_dir: &Path) -> Vec<(String, PathBuf, Option<Meta>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(snapshots_dir(state_dir)) else { return out };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let used = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        out.push((name, e.path(), read_meta(&e.path()), used));
    }
    out.sort_by_key(|(_, _, _, used)| *used);
    out
}

/// The janitor's pass: removes the snapshots for which `current` says no (their key is no longer
/// configured: another kernel, initramfs, QEMU or image digest), those without meta (a save
/// that died; only when older than ten minutes, a save may be writing one), and beyond [`KEEP`]
/// the least recently used. Returns the removed ids.
pub(crate) fn prune(state_dir: &Path, current: &dyn Fn(&Meta) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for (id, dir, meta, used) in list(state_dir) {
        let stale = match &meta {
            Some(m) => !current(m),
            None => used.elapsed().map(|d| d.as_secs() > 600).unwrap_or(true),
        };
        if stale {
            forget(&id);
            remove_dir(&dir);
            removed.push(id);
        } else if meta.is_some() {
            kept.push((id, dir));
        }
    }
    let extra = kept.len().saturating_sub(KEEP);
    for (id, dir) in kept.into_iter().take(extra) {
        forget(&id);
        remove_dir(&dir);
        removed.push(id);
    }
    removed
}

/// `validate`'s line: whether snapshots work here and what the pool does with them.
pub(crate) fn support(enabled: bool) -> String {
    if !enabled {
        return "snapshots: off (EXECUTOR_VM_SNAPSHOTS=false); pool VMs boot".into();
    }
    let qemu = match qemu_version() {
        Ok(v) => v,
        Err(e) => return format!("snapshots: unavailable ({e:#}); pool VMs boot cold"),
    };
    let what = "QMP migrate of the devices to a stream, the template's RAM a sealed memfd that restored VMs \
         map copy-on-write (memory-backend-file share=off, x-ignore-shared), both checked by SHA-256";
    format!(
        "snapshots: {qemu}: {what}; the pool saves one template per key and restores its VMs from it \
         (each VM's own address, entropy, clock and machine id given at restore), and a job that finds \
         no ready VM has one restored"
    )
}

/// The janitor's pass with what it can judge: a snapshot is of a key still configured while its
/// kernel and initramfs are the installed ones, its QEMU the one on the host, each of its
/// images resolves to the same digest in the image store, and each disk its template had is
/// still the same file (a cache version's disk goes with its version); limits and image sets
/// are the pool's to judge: it removes the snapshot of a key it moved away from.
pub(crate) fn janitor(rt: &super::MicroVm) -> Vec<String> {
    let ids = installed_ids(&rt.opts.state_dir).ok();
    let qemu = qemu_version().ok();
    let removed = prune(&rt.opts.state_dir, &|m: &Meta| {
        !m.ram_sha256.is_empty()
            && ids.as_ref().is_some_and(|(k, i)| *k == m.kernel && *i == m.initramfs)
            && qemu.as_deref() == Some(m.qemu.as_str())
            && m.images.iter().all(|(r, d)| rt.resolve_image(r).is_ok_and(|(digest, _)| digest == *d))
            && m.image_disks.iter().all(|id| disk_unchanged(id))
    });
    for id in &removed {
        tracing::info!("janitor: removed VM snapshot {id}");
    }
    removed
}

/// Writes a finished snapshot into place: the stream and meta written in `tmp` are renamed to
/// the key's directory in one step (a reader sees a whole snapshot or none).
pub(crate) fn install(state_dir: &Path, tmp: &Path, key: &Key, meta: &Meta) -> Result<Snapshot> {
    let id = key_id(key);
    let bytes = serde_json::to_vec_pretty(meta).context("encoding a snapshot's meta")?;
    std::fs::write(tmp.join(META), bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let dir = snapshots_dir(state_dir).join(&id);
    remove_dir(&dir);
    std::fs::rename(tmp, &dir).with_context(|| format!("moving the snapshot into {}", dir.display()))?;
    Ok(Snapshot { id, dir, meta: meta.clone() })
}

/// A file's identity for a key: path, size and modification time.
fn file_id(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => format!("{} {} {}.{}", p.display(), m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{} missing", p.display()),
    }
}

/// The kernel's and the initramfs' parts of a key, as installed now.
pub(crate) fn installed_ids(state_dir: &Path) -> Result<(String, String)> {
    let m = crate::vm::installed(state_dir)?;
    Ok((
        format!("{} {}", m.kernel_version, file_id(&m.vmlinux)),
        format!("{} {}", m.initramfs_inputs, file_id(&m.initramfs)),
    ))
}

/// An image disk file's identity: path, inode, size and modification time.
pub(crate) fn disk_id(p: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(format!("{} {} {} {}.{}", p.display(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Whether the disk of identity `id` ([`disk_id`]) is still that file.
fn disk_unchanged(id: &str) -> bool {
    // The path may hold spaces; the four fields after it do not.
    let path = id.rsplitn(4, ' ').nth(3).unwrap_or_default();
    !path.is_empty() && disk_id(Path::new(path)).is_ok_and(|now| now == id)
}

/// Checks that a restore gets the image disk files its template had.
pub(crate) fn check_disks(snap: &Snapshot, disks: &[PathBuf]) -> Result<()> {
    let now = disks.iter().map(|d| disk_id(d)).collect::<Result<Vec<_>>>()?;
    if now != snap.meta.image_disks {
        anyhow::bail!("the image disks of snapshot {} changed since it was saved", snap.id);
    }
    Ok(())
}

/// Lowercase hex.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    fn key(mem: u64) -> Key {
        Key {
            text: format!("kernel 6.1, memory {mem}, busybox sha256:b"),
            kernel: "6.1 vmlinux 1 2.3".into(),
            initramfs: "abc initramfs 4 5.6".into(),
            images: vec![("busybox".into(), "sha256:b".into())],
        }
    }

    fn meta(k: &Key, stream: &[u8]) -> Meta {
        use sha2::Digest;
        Meta {
            key: k.text.clone(),
            kernel: k.kernel.clone(),
            initramfs: k.initramfs.clone(),
            images: k.images.clone(),
            qemu: qemu_version().unwrap_or_default(),
            bytes: stream.len() as u64,
            sha256: hex(&sha2::Sha256::digest(stream)),
            boot_ms: 1,
            save_ms: 1,
            image_disks: vec![],
            ram_bytes: 0,
            ram_sha256: "0".repeat(64),
        }
    }

    fn save(state: &Path, k: &Key, stream: &[u8]) -> Snapshot {
        let tmp = snapshots_dir(state).join(format!("tmp-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join(STATE), stream).unwrap();
        std::fs::write(tmp.join(ram::RAM), b"").unwrap();
        install(state, &tmp, k, &meta(k, stream)).unwrap()
    }

    #[test]
    fn validate_says_what_the_pool_does_with_snapshots() {
        assert!(support(false).contains("off (EXECUTOR_VM_SNAPSHOTS=false)"));
        let on = support(true);
        if qemu_version().is_ok() {
            assert!(on.contains("QEMU") && on.contains("restores its VMs"), "{on}");
            assert!(on.contains("own address"), "{on}");
        } else {
            assert!(on.contains("unavailable"), "{on}");
        }
    }

    #[test]
    fn keys_have_their_own_snapshot() {
        assert_eq!(key_id(&key(1 << 29)), key_id(&key(1 << 29)));
        assert_ne!(key_id(&key(1 << 29)), key_id(&key(1 << 30)));
        assert_eq!(key_id(&key(1 << 29)).len(), 16);
        if qemu_version().is_err() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let s = save(d.path(), &key(1 << 29), b"stream");
        assert_eq!(find(d.path(), &key(1 << 29)).unwrap().unwrap().dir, s.dir);
        assert!(find(d.path(), &key(1 << 30)).unwrap().is_none());
        // A stream cut short is no snapshot, and goes.
        std::fs::write(s.state_path(), b"str").unwrap();
        assert!(find(d.path(), &key(1 << 29)).unwrap().is_none());
        assert!(!s.dir.exists());
    }

    #[test]
    fn the_janitor_removes_snapshots_of_keys_gone_and_beyond_the_budget() {
        let d = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for i in 0..(KEEP as u64 + 2) {
            let k = key((i + 1) << 28);
            ids.push(save(d.path(), &k, b"stream").id);
            let f = std::fs::File::open(snapshots_dir(d.path()).join(ids.last().unwrap())).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i)).unwrap();
        }
        // A half-written save of long ago.
        let dead = snapshots_dir(d.path()).join("tmp-dead");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::File::open(&dead).unwrap().set_modified(std::time::UNIX_EPOCH).unwrap();
        // The key of the last one is no longer configured (its memory limit, say).
        let gone = ids.last().unwrap().clone();
        let gone_key = key((KEEP as u64 + 2) << 28).text;
        let removed = prune(d.path(), &|m: &Meta| m.key != gone_key);
        assert!(removed.contains(&gone) && removed.contains(&"tmp-dead".to_string()), "{removed:?}");
        // Of the KEEP + 1 current ones, the least recently used goes.
        assert!(removed.contains(&ids[0]) && !removed.contains(&ids[1]), "{removed:?}");
        assert_eq!(list(d.path()).len(), KEEP);
    }

    #[test]
    fn a_disk_is_unchanged_while_it_is_the_same_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("cache v-1").join("disk.ext4");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"ext4").unwrap();
        let id = disk_id(&f).unwrap();
        assert!(disk_unchanged(&id));
        // Made again (another file at the same path), then gone with its version.
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, b"ext4!").unwrap();
        assert!(!disk_unchanged(&id));
        std::fs::remove_file(&f).unwrap();
        assert!(!disk_unchanged(&id) && !disk_unchanged("") && !disk_unchanged("x y"));
    }
}
