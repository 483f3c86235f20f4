//! Images built on this host: `build-busybox` (a tiny test image from the host's static busybox,
//! plus git and the libraries it links) and `build-base` (a minimal Debian from debootstrap).

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{ImageMeta, ImageStore, ResolvedImage};

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Directories every image gets, so that the runtime's mounts have somewhere to land.
const SKELETON: &[&str] = &["bin", "dev", "etc", "proc", "sys", "tmp", "data", "root", "usr/bin", "usr/lib"];

/// Builds the busybox test image as `name`.
pub fn build_busybox(store: &ImageStore, name: &str) -> Result<ResolvedImage> {
    super::Reference::parse(name)?;
    let busybox =
        which::which("busybox").context("busybox is not installed (Debian package busybox-static)")?;
    if !is_static(&busybox)? {
        bail!("{} is not statically linked: install busybox-static", busybox.display());
    }
    let staging = store.staging("busybox")?;
    let root = staging.path().join("tree");
    for d in SKELETON {
        fs::create_dir_all(root.join(d))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::copy(&busybox, root.join("bin/busybox")).with_context(|| format!("copying {}", busybox.display()))?;
    let list =
        crate::base::proc::command(&busybox).arg("--list").output().context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    if let Ok(git) = which::which("git") {
        add_binary_with_libraries(&root, &git, Path::new("usr/bin/git"))?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    // A networked sandbox binds its own resolvers over this file (docs/network.md).
    fs::write(root.join("etc/resolv.conf"), "")?;
    commit(store, &root, name, "build-busybox")
}

/// Builds a minimal Debian bookworm image with debootstrap as `name`.
pub fn build_base(store: &ImageStore, name: &str, mirror: Option<&str>) -> Result<ResolvedImage> {
    super::Reference::parse(name)?;
    let debootstrap =
        which::which("debootstrap").context("debootstrap is not installed (Debian package debootstrap)")?;
    let staging = store.staging("base")?;
    let root = staging.path().join("tree");
    let mut cmd = crate::base::proc::command(debootstrap);
    crate::base::proc::Inherit::inherit(&mut cmd, crate::base::proc::PROXY);
    cmd.args(["--variant=minbase", "--include=bash,coreutils,git,ca-certificates", "bookworm"]).arg(&root);
    if let Some(m) = mirror {
        cmd.arg(m);
    }
    // debootstrap's own output goes to our stderr: stdout belongs to documents only.
    cmd.stdout(std::process::Stdio::from(std::io::stderr().as_fd_owned()?));
    let status = cmd.status().context("running debootstrap")?;
    if !status.success() {
        bail!("debootstrap failed for image {name} ({status})");
    }
    // The runtime supplies /dev; the image must hold no device nodes. Caches are dropped.
    for d in ["dev", "var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = root.join(d);
        if p.is_dir() {
            for e in fs::read_dir(&p)? {
                let e = e?;
                if e.file_type()?.is_dir() && d != "dev" {
                    continue;
                }
                let path = e.path();
                if e.file_type()?.is_dir() {
                    fs::remove_dir_all(&path)?;
                } else {
                    fs::remove_file(&path)?;
                }
            }
        }
    }
    fs::create_dir_all(root.join("data"))?;
    commit(store, &root, name, "build-base")
}

fn commit(store: &ImageStore, root: &Path, name: &str, source: &str) -> Result<ResolvedImage> {
    super::shift_ownership(root)?;
    let (digest, size) = super::tree_digest(root)?;
    let meta = ImageMeta {
        digest,
        env: vec![PATH.to_string()],
        workdir: "/".into(),
        user: String::new(),
        size,
        disk: 0,
        created: super::now(),
        source: source.into(),
        layers: Vec::new(),
        private: false,
    };
    store.commit_tree(root, &meta, name)
}

fn is_static(path: &Path) -> Result<bool> {
    let out = crate::base::proc::command("ldd").arg(path).output();
    Ok(match out {
        Ok(o) => !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic"),
        Err(_) => true,
    })
}

/// Copies `bin` to `dest` inside `root` with every library `ldd` lists, at the same paths.
fn add_binary_with_libraries(root: &Path, bin: &Path, dest: &Path) -> Result<()> {
    copy_into(root, bin, dest)?;
    let out = crate::base::proc::command("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else { continue };
        let lib = PathBuf::from(path);
        let rel = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
        copy_into(root, &lib, &rel)?;
    }
    Ok(())
}

fn copy_into(root: &Path, src: &Path, rel: &Path) -> Result<()> {
    let dest = root.join(rel);
    if dest.exists() {
        return Ok(());
    }
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

trait StderrFd {
    fn as_fd_owned(&self) -> Result<std::os::fd::OwnedFd>;
}

impl StderrFd for std::io::Stderr {
    fn as_fd_owned(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().context("duplicating stderr")
    }
}
