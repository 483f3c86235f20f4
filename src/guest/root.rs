//! A step's root and output in the guest: the agent's port and the frames a step's output goes
//! out in, and the overlay root a step runs in (its image disk under a layer of its own, the
//! workspace at /data). Shared by the agent (agent.rs) and the engine's steps (engine.rs).

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::protocol::{Frame, Kind, KEPT_LAYER, MAX_CHUNK};

/// The agent's port, shared by the threads that answer the host.
pub(crate) type Port = Arc<Mutex<File>>;

pub(crate) fn send(port: &Port, frame: &Frame) {
    // A write fails while no host is connected; the host resynchronises with a hello.
    let mut f = port.lock().unwrap_or_else(|p| p.into_inner());
    let _ = frame.write_to(&mut *f);
}

/// Sends what `r` gives as `kind` data frames of request `id`, until its end.
pub(crate) fn pump(port: Port, id: u32, kind: Kind, mut r: impl Read) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => send(&port, &Frame::data(kind, id, &buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Where a step's writable layer lives: `/data/.executor-root-<id>` on the workspace disk (so
/// the job's disk cap counts what the step writes anywhere, as with the `oci` runtime), or a
/// tmpfs when there is no workspace.
fn layer_name(id: u32) -> String {
    format!(".executor-root-{id:08x}")
}

/// The directory of step `id`'s layer and mount point, and whether it is on the workspace disk.
pub(crate) fn step_base(id: u32) -> (PathBuf, bool) {
    if Path::new("/data").is_dir() {
        (Path::new("/data").join(layer_name(id)), true)
    } else {
        (PathBuf::from(format!("/run/steps/{id}")), false)
    }
}

/// Mounts the step's root (the overlay module loaded): the image read-only (`lower`: overlay's `lowerdir`, the image's
/// directory or several, highest first) under an overlay layer of the step's own (each step
/// starts from the pristine image), the workspace at /data (the layer hidden under an empty
/// read-only tmpfs there), and fresh /proc, /dev and /tmp.
pub(crate) fn step_root(id: u32, lower: &str) -> Result<PathBuf> {
    let (base, on_disk) = step_base(id);
    if on_disk {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&base)
            .with_context(|| format!("creating {}", base.display()))?;
    }
    layer_root(&base, on_disk.then(|| layer_name(id)).as_deref(), lower)
}

/// Mounts a root over the kept layer (`/data/.executor-kept`, left by a failed step run with
/// `keep_failed`) for `executor debug`: what the step wrote is there as it left it, and what the
/// shell writes adds to it. A fresh overlay work directory: the last one may be half used.
pub(crate) fn kept_root(lower: &str) -> Result<PathBuf> {
    let base = Path::new("/data").join(KEPT_LAYER);
    if !base.join("upper").is_dir() {
        bail!("no failed step's layer is kept in this VM");
    }
    let work = base.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    layer_root(&base, Some(KEPT_LAYER), lower)
}

/// Makes a failed step's layer (`base`, its root unmounted) the kept layer, replacing an
/// earlier one.
pub(crate) fn keep_layer(base: &Path) -> Result<()> {
    let kept = Path::new("/data").join(KEPT_LAYER);
    if kept.exists() {
        fs::remove_dir_all(&kept).with_context(|| format!("removing {}", kept.display()))?;
    }
    fs::rename(base, &kept).with_context(|| format!("keeping {} as {}", base.display(), kept.display()))
}

/// Mounts a step's root over the layer in `base`: `hidden` names it at the top of /data, where
/// an empty read-only tmpfs covers it.
fn layer_root(base: &Path, hidden: Option<&str>, lower: &str) -> Result<PathBuf> {
    let (upper, work, root) = (base.join("upper"), base.join("work"), base.join("root"));
    for d in [&upper, &work, &root] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display());
    mount(Some("overlay"), &root, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
        .context("mounting the step's root overlay")?;
    for d in ["data", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(d)).with_context(|| format!("creating /{d} in the step's root"))?;
    }
    mount(Some("/data"), &root.join("data"), None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .context("binding /data into the step's root")?;
    if let Some(name) = hidden {
        mount(
            Some("tmpfs"),
            &root.join("data").join(name),
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=000,size=4k"),
        )
        .context("hiding the step's layer in /data")?;
    }
    mount(Some("proc"), &root.join("proc"), Some("proc"), MsFlags::empty(), None::<&str>)
        .context("mounting /proc in the step's root")?;
    mount(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .context("mounting /sys in the step's root")?;
    mount(Some("devtmpfs"), &root.join("dev"), Some("devtmpfs"), MsFlags::MS_NOSUID, None::<&str>)
        .context("mounting /dev in the step's root")?;
    mount(Some("tmpfs"), &root.join("tmp"), Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=1777"))
        .context("mounting /tmp in the step's root")?;
    super::net::write_resolv_conf(&root)?;
    super::identity::write_machine_id(&root)?;
    Ok(root)
}
