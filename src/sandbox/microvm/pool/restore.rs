//! The pool's VMs from snapshots (snapshot.rs): the template of the pool's key is saved once,
//! every pool VM is restored from it, and a job that finds no ready VM has one restored on its
//! path rather than booted. A save or restore that fails is said in the log and the VM boots
//! cold, its record saying why (`VmDetails::cold_boot`); a restore that failed removes the
//! snapshot, so that the next refill saves a fresh one.

use anyhow::{bail, Context, Result};
use std::time::Instant;

use super::super::snapshot::{self, Snapshot};
use super::super::{MicroVm, VmBoot, VmDetails};
use super::{Claim, Member, Pool, PoolKey};
use crate::sandbox::{BootRequest, RecordDetails, Runtime, SandboxRecord};

/// How long the VMs of a key whose snapshot could not be saved boot cold before a save is tried
/// again.
const SAVE_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

impl Pool {
    /// Why the VMs of `key` boot cold for now: its snapshot could not be saved less than
    /// [`SAVE_RETRY`] ago.
    pub(super) fn save_failed_recently(&self, key: &PoolKey) -> Option<String> {
        match &self.state().save_failed {
            Some((k, why, when)) if k == key && when.elapsed() < SAVE_RETRY => Some(why.clone()),
            _ => None,
        }
    }

    /// The snapshot VMs of `key` are restored from, saved now if there is none (its template
    /// made as slot `slot`'s VM, under the cold lock: one cold boot at a time); or why VMs of
    /// `key` boot cold. A key whose save failed is tried again only after [`SAVE_RETRY`].
    pub(super) fn snapshot_for(&self, slot: u64, key: &PoolKey, boot: &VmBoot) -> Result<Snapshot, String> {
        if !self.rt.opts.vm_snapshots {
            return Err("snapshots are off (EXECUTOR_VM_SNAPSHOTS=false)".into());
        }
        let _cold = self.cold.lock().unwrap_or_else(|p| p.into_inner());
        // Looked at under the cold lock: another maker may have saved it (or failed to) meanwhile.
        if let Some(why) = self.save_failed_recently(key) {
            return Err(why);
        }
        let state_dir = &self.rt.opts.state_dir;
        match snapshot::find(state_dir, &snap_key(key)) {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => {}
            Err(e) => return Err(format!("{e:#}")),
        }
        let name = format!("{}-{}", self.cfg.prefix, uuid::Uuid::new_v4());
        if self.making_as(slot, &name).is_err() {
            return Err("the pool is stopping".into());
        }
        self.publish();
        let taken = self.own(&name).and_then(|()| self.take_snapshot(&name, boot, key));
        let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(&name));
        match taken {
            Ok(s) => {
                // The booter restores the pool's other VMs from it now, beside this one's.
                self.cv.notify_all();
                self.log(&format!(
                    "VM pool: saved snapshot {} ({}; template booted in {} ms, saved in {} ms)",
                    s.id,
                    crate::base::units::format_bytes(s.meta.bytes),
                    s.meta.boot_ms,
                    s.meta.save_ms
                ));
                Ok(s)
            }
            Err(e) => {
                let why = format!("saving a snapshot failed: {e:#}");
                self.log(&format!("VM pool: {why}; booting VMs cold"));
                self.state().save_failed = Some((key.clone(), why.clone(), Instant::now()));
                Err(why)
            }
        }
    }

    /// Removes the snapshot of `key` a restore from `failed` found at fault, unless it is
    /// another one already: VMs restored at once from one snapshot may all fail, and the first
    /// of them to fail saves a fresh one that the others must not remove.
    fn discard_snapshot(&self, key: &PoolKey, failed: &Snapshot) {
        let sk = snap_key(key);
        if let Ok(Some(now)) = snapshot::find(&self.rt.opts.state_dir, &sk) {
            if now.meta.sha256 == failed.meta.sha256 {
                snapshot::remove(&self.rt.opts.state_dir, &sk);
            }
        }
    }

    /// Restores VM `name` (slot `slot`'s) from `snap`, or boots it cold when there is none or
    /// the restore fails (under the cold lock: one cold boot at a time); the record says which,
    /// and why.
    pub(super) fn restore_or_boot(
        &self,
        slot: u64,
        name: &str,
        boot: &VmBoot,
        key: &PoolKey,
        snap: Result<&Snapshot, String>,
    ) -> Result<SandboxRecord> {
        let why = match snap {
            Ok(s) => {
                let mut restore = boot.clone();
                restore.restore = Some(s);
                restore.timeout = restore_timeout(boot);
                let mut res = self.own(name).and_then(|()| self.rt.boot_vm(name, &restore));
                if let Err(e) = &res {
                    // A restored guest that died or never answered: under a suite's full load a
                    // template saved then gave guests that panicked right after every restore,
                    // while a template saved again later restored fine. That snapshot goes, a
                    // fresh one is saved and this VM restored from it, once.
                    if e.downcast_ref::<super::super::AgentSilent>().is_some() && !self.state().stopped {
                        self.log(&format!("VM pool: {e:#}; saving a fresh snapshot for VM {name}"));
                        let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(name));
                        self.discard_snapshot(key, s);
                        if let Ok(fresh) = self.snapshot_for(slot, key, boot) {
                            self.making_as(slot, name)?;
                            let mut again = boot.clone();
                            again.restore = Some(&fresh);
                            again.timeout = restore_timeout(boot);
                            res = self.own(name).and_then(|()| self.rt.boot_vm(name, &again));
                        }
                    }
                }
                match res {
                    Ok(rec) => return Ok(rec),
                    // No network for the VM: a cold boot would find none either, and the
                    // snapshot is not at fault.
                    Err(e) if super::super::net::is_setup_failure(&e) => return Err(e),
                    // Killed by the pool's stop: the snapshot is not at fault either.
                    Err(e) if self.state().stopped => return Err(e),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(name));
                        self.discard_snapshot(key, s);
                        let why = format!("restoring snapshot {} failed: {e:#}", s.id);
                        self.log(&format!("VM pool: {why}; removed it, booting VM {name} cold"));
                        why
                    }
                }
            }
            Err(why) => why,
        };
        let _cold = self.cold.lock().unwrap_or_else(|p| p.into_inner());
        self.making_as(slot, name)?;
        let mut rec = self.own(name).and_then(|()| self.rt.boot_vm(name, boot))?;
        if let Ok(Some(mut det)) = VmDetails::of(&rec) {
            det.cold_boot = Some(why);
            det.store(&mut rec);
        }
        Ok(rec)
    }

    /// A job found no ready VM (`why`): one is restored for it from the snapshot of its key, its
    /// workspace attached and its network made for what the job may reach, when such a snapshot
    /// exists; otherwise the job boots its own.
    pub(super) fn restore_for_job(&self, req: &BootRequest, key: PoolKey, why: String) -> Claim {
        let images = key_images(&key);
        let boot = match self.member_boot_reaching(&key, &images, req.reach()) {
            Ok(b) => b,
            Err(e) => return Claim::Miss(format!("{why}; {e:#}")),
        };
        if !self.rt.opts.vm_snapshots {
            return Claim::Miss(why);
        }
        let snap = match snapshot::find(&self.rt.opts.state_dir, &snap_key(&key)) {
            Ok(Some(s)) => s,
            Ok(None) => return Claim::Miss(format!("{why}; no snapshot of the job's key yet")),
            Err(e) => return Claim::Miss(format!("{why}; {e:#}")),
        };
        let t = Instant::now();
        let name = format!("{}-{}", self.cfg.prefix, uuid::Uuid::new_v4());
        let mut restore = boot.clone();
        restore.restore = Some(&snap);
        restore.timeout = restore_timeout(&boot);
        let rec = match self.own(&name).and_then(|()| self.rt.boot_vm(&name, &restore)) {
            Ok(r) => r,
            Err(e) if super::super::net::is_setup_failure(&e) => {
                let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(&name));
                return Claim::Miss(format!("{why}; {e:#}"));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(&name));
                self.discard_snapshot(&key, &snap);
                return Claim::Miss(format!("{why}; restoring snapshot {} failed: {e:#}", snap.id));
            }
        };
        let socket = MicroVm::details(&rec).map(|d| d.socket).unwrap_or_default();
        let ch = self.rt.take_idle(&rec, &socket);
        let mut member = Member { rec, key, ch, ready_at: Instant::now() };
        let restore_ms = t.elapsed().as_millis() as u64;
        match self.attach(&mut member, req.workspace) {
            Ok(mut claim) => {
                claim.on_demand_ms = Some(restore_ms);
                Claim::Hit(Box::new(self.hand_over(member, claim)))
            }
            Err(e) => {
                let name = member.rec.name.clone();
                self.destroy(member);
                Claim::Miss(format!("{why}; attaching the workspace to restored VM {name} failed: {e:#}"))
            }
        }
    }

    /// Boots the template VM `name` for `key` with `boot` (made a template here), saves it
    /// into a new snapshot and tears it down. A save that fails anywhere leaves no snapshot.
    fn take_snapshot(&self, name: &str, boot: &VmBoot, key: &PoolKey) -> Result<Snapshot> {
        // The image disks first: one built by the template's own boot would be newer than its
        // start, and the check below could not tell it from a disk replaced while it booted
        // (every first template on a fresh state directory would fail).
        for reference in boot.images {
            self.rt.image_disk(reference)?;
        }
        let t0 = Instant::now();
        let started = std::time::SystemTime::now();
        let mut template = boot.clone();
        template.template = true;
        let ram_size = template.memory_bytes();
        let ram = snapshot::ram::template_ram(ram_size)?;
        template.template_ram = Some(ram.clone());
        let rec = self.rt.boot_vm(name, &template)?;
        let boot_ms = t0.elapsed().as_millis() as u64;
        // The template keeps no connection: the host talks to each restored VM anew.
        let det = MicroVm::details(&rec).ok();
        if let Some(d) = &det {
            drop(self.rt.take_idle(&rec, &d.socket));
        }
        // The image disks the guest mounted: files made before the template started (one
        // replaced while it booted may not be the file QEMU opened) and unchanged by the save.
        let disks: Vec<std::path::PathBuf> =
            det.map(|d| d.images.iter().map(|i| i.disk.clone()).collect()).unwrap_or_default();
        let ids = || disks.iter().map(|d| snapshot::disk_id(d)).collect::<Result<Vec<_>>>();
        let fresh = disks
            .iter()
            .any(|d| std::fs::metadata(d).and_then(|m| m.modified()).map_or(true, |m| m >= started));
        let tmp =
            snapshot::snapshots_dir(&self.rt.opts.state_dir).join(format!("tmp-{}", uuid::Uuid::new_v4()));
        let saved = (|| {
            if fresh {
                bail!("an image disk was made while the template booted");
            }
            let before = ids()?;
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let saved = snapshot::save(&rec.state_dir, &tmp.join(snapshot::STATE))?;
            if ids()? != before {
                bail!("an image disk changed while the template was saved");
            }
            Ok((saved, before))
        })();
        let _ = self.rt.teardown(&rec);
        // QEMU is gone: its RAM, sealed now, goes beside the stream.
        let saved =
            saved.and_then(|s| Ok((s, snapshot::ram::save(&ram, ram_size, &tmp.join(snapshot::ram::RAM))?)));
        let (((bytes, sha256, save_ms), image_disks), (ram_bytes, ram_sha256)) = match saved {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.context(format!("saving template VM {name}")));
            }
        };
        let sk = snap_key(key);
        let meta = snapshot::Meta {
            key: sk.text.clone(),
            kernel: sk.kernel.clone(),
            initramfs: sk.initramfs.clone(),
            images: sk.images.clone(),
            qemu: snapshot::qemu_version()?,
            bytes,
            sha256,
            image_disks,
            boot_ms,
            save_ms,
            ram_bytes,
            ram_sha256,
        };
        let snap = snapshot::install(&self.rt.opts.state_dir, &tmp, &sk, &meta).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        snapshot::ram::remember(&snap.id, &snap.meta.ram_sha256, ram);
        Ok(snap)
    }

    /// The boot of a VM of `key` with `images` (its images by reference, [`key_images`]), whose
    /// network (if any) reaches the pool's coordinator.
    pub(super) fn member_boot<'a>(&'a self, key: &PoolKey, images: &'a [String]) -> Result<VmBoot<'a>> {
        let reach = crate::network::Reach { coordinator: self.cfg.coordinator.as_deref(), endpoints: &[] };
        self.member_boot_reaching(key, images, reach)
    }

    /// [`Pool::member_boot`] with a network that reaches `reach`.
    fn member_boot_reaching<'a>(
        &'a self,
        key: &PoolKey,
        images: &'a [String],
        reach: crate::network::Reach<'a>,
    ) -> Result<VmBoot<'a>> {
        let (accel, why) = self.rt.choose_accel()?;
        if accel.to_string() != key.base.accel {
            bail!("the accelerator changed");
        }
        let timeout = if accel == super::super::Accel::Kvm {
            std::time::Duration::from_secs(20)
        } else {
            std::time::Duration::from_secs(120)
        };
        let mut boot = VmBoot::new(None, images, accel, why, &self.cfg.limits, timeout)
            .with_network(super::super::net::request(&self.rt.opts, reach));
        boot.pool_disk_bytes = Some(key.base.disk_bytes);
        Ok(boot.with_extra_disks(super::super::caches::disks(&key.caches)))
    }
}

/// How long a restored VM's agent may take to answer: a restore is QEMU's start and the
/// stream's read (0.3 to 2 s under TCG here), far less than the cold boot `boot` allows.
fn restore_timeout(boot: &VmBoot) -> std::time::Duration {
    boot.timeout.min(std::time::Duration::from_secs(60))
}

/// What the snapshot of a pool key is of.
pub(super) fn snap_key(key: &PoolKey) -> snapshot::Key {
    snapshot::Key {
        text: format!("{key:?}"),
        kernel: key.base.kernel.clone(),
        initramfs: key.base.initramfs.clone(),
        images: key.images.clone(),
    }
}

/// The image references of a key, in its order.
pub(super) fn key_images(key: &PoolKey) -> Vec<String> {
    key.images.iter().map(|(r, _)| r.clone()).collect()
}
