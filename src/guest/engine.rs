//! A step in the guest's container engine (a `cliSteps` job's `src`, as Sourcegraph's Firecracker
//! executors run it): its root is the engine's disk (a Debian tree with podman, see
//! `executor install vm --engine`) with the `src` disk stacked above it, run as root and privileged inside
//! the VM (the VM is the boundary). The engine's store lives on the workspace disk beside the
//! step's layer (hidden from /data like it), and the step images the host pulled are loaded into
//! it from their read-only disks before the step starts, so the guest needs no registry.

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::protocol::{EngineImage, EngineSetup, Frame, Kind};
use super::root::{pump, send, step_base, step_root, Port};

/// Where the image disks appear inside the engine's root.
const IMAGES_IN_ROOT: &str = "run/executor/images";

/// Mounts the root of engine step `id`: the engine's disk `engine` under `setup.upper`, the
/// cgroup v2 tree, a fresh /run, /dev/pts and /dev/shm, the engine's store on the workspace
/// disk, and the image disks read-only; then loads the images into the engine, their output on
/// the step's stderr.
pub(crate) fn engine_root(port: &Port, id: u32, engine: u32, setup: &EngineSetup) -> Result<PathBuf> {
    let mut lower: Vec<String> = setup.upper.iter().map(|d| format!("/images/{d}")).collect();
    lower.push(format!("/images/{engine}"));
    let root = step_root(id, &lower.join(":"))?;
    let (base, _) = step_base(id);
    let store = base.join("store");
    fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let m = |src: &str, target: PathBuf, fstype: Option<&str>, flags: MsFlags, data: Option<&str>| {
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        mount(Some(src), &target, fstype, flags, data)
            .with_context(|| format!("mounting {src} on {} in the engine's root", target.display()))
    };
    m("cgroup2", root.join("sys/fs/cgroup"), Some("cgroup2"), MsFlags::empty(), None)?;
    m("tmpfs", root.join("run"), Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    m("devpts", root.join("dev/pts"), Some("devpts"), MsFlags::empty(), Some("newinstance,ptmxmode=0666"))?;
    m("shm", root.join("dev/shm"), Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    let store_src = store.to_string_lossy().into_owned();
    m(&store_src, root.join("var/lib/containers"), None, MsFlags::MS_BIND, None)?;
    for img in &setup.images {
        let target = root.join(IMAGES_IN_ROOT).join(img.disk.to_string());
        m(&format!("/images/{}", img.disk), target.clone(), None, MsFlags::MS_BIND, None)?;
        // A bind mount takes its flags only on a remount.
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", target.display()))?;
    }
    if !setup.images.is_empty() {
        load_images(port, id, &root, &setup.images)?;
    }
    Ok(root)
}

/// `s` quoted for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A value quoted for a Dockerfile instruction (`ENV K="v"`).
fn df_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// The shell script that loads `images` into the engine: each image tree as one layer, with the
/// config the image store kept (environment, working directory, user), under every name.
pub(crate) fn load_script(images: &[EngineImage]) -> String {
    let mut s = String::from("set -e\n");
    for img in images {
        // podman names an imported image by name and tag only: one named by digest cannot be
        // loaded under that name (docs/sandbox-microvm.md), which the step's log says.
        let (pinned, names): (Vec<&String>, Vec<&String>) = img.names.iter().partition(|n| n.contains('@'));
        for p in pinned {
            let note = format!(
                "executor: image {p} is named by digest, which the guest's engine cannot load it under"
            );
            s.push_str(&format!("echo {} >&2\n", sh_quote(&note)));
        }
        let Some((first, rest)) = names.split_first() else { continue };
        let mut changes = Vec::new();
        for kv in &img.env {
            if let Some((k, v)) = kv.split_once('=') {
                if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    changes.push(format!("ENV {k}={}", df_quote(v)));
                }
            }
        }
        if !img.workdir.is_empty() {
            changes.push(format!("WORKDIR {}", img.workdir));
        }
        if !img.user.is_empty() {
            changes.push(format!("USER {}", img.user));
        }
        s.push_str(&format!(
            "echo {} >&2\n",
            sh_quote(&format!("executor: loading image {first} into the engine"))
        ));
        s.push_str(&format!(
            "tar -C /{IMAGES_IN_ROOT}/{} --numeric-owner -cf - . | podman import -q",
            img.disk
        ));
        for c in &changes {
            s.push_str(&format!(" --change {}", sh_quote(c)));
        }
        s.push_str(&format!(" - {} >&2\n", sh_quote(first)));
        for other in rest {
            s.push_str(&format!("podman tag {} {} >&2\n", sh_quote(first), sh_quote(other)));
        }
    }
    s
}

/// Loads the images into the engine (root's podman), streaming what it says as the step's
/// stderr; an error when it fails.
fn load_images(port: &Port, id: u32, root: &Path, images: &[EngineImage]) -> Result<()> {
    let mut cmd = crate::base::proc::command("/bin/sh");
    cmd.args(["-c", &load_script(images)]);
    crate::base::sys::enter_root(&mut cmd, root, "/").context("the engine's root")?;
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting the engine's image load")?;
    let err = child.stderr.take().map(|e| {
        let p = port.clone();
        std::thread::spawn(move || pump(p, id, Kind::Stderr, e))
    });
    // The host takes 30 s of silence for a dead agent: the load, tens of seconds under TCG,
    // says it is alive every second as a step does.
    let (stop, ticks) = std::sync::mpsc::channel::<()>();
    let ticker = {
        let p = port.clone();
        std::thread::spawn(move || loop {
            send(&p, &Frame::data(Kind::Alive, id, b""));
            if ticks.recv_timeout(std::time::Duration::from_secs(1))
                != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                return;
            }
        })
    };
    let status = child.wait().context("waiting for the engine's image load");
    drop(stop);
    let _ = ticker.join();
    if let Some(t) = err {
        let _ = t.join();
    }
    let status = status?;
    if !status.success() {
        send(
            port,
            &Frame::data(Kind::Stderr, id, b"executor: loading the step images into the engine failed\n"),
        );
        bail!("loading the step images into the guest's engine failed ({status})");
    }
    Ok(())
}

/// Unmounts everything mounted below `root` (deepest first): the layers of the containers an
/// engine step left, which would keep its store busy.
pub(crate) fn unmount_below(root: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = root.to_string_lossy().into_owned();
    let mut below: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&format!("{prefix}/")))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in below {
        let _ = umount2(Path::new(&p), MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img2() -> EngineImage {
        EngineImage { disk: 0, names: vec![], env: vec![], workdir: String::new(), user: String::new() }
    }

    #[test]
    fn the_load_script_quotes_what_the_image_config_holds() {
        let img = EngineImage {
            disk: 2,
            names: vec!["docker.io/library/alpine:3.19".into(), "alpine:3.19".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "Q=it's \"x\"".into(), "bad key=1".into()],
            workdir: "/src".into(),
            user: "1000:1000".into(),
        };
        let s = load_script(&[img]);
        assert!(s.starts_with("set -e\n"), "{s}");
        assert!(
            s.contains("tar -C /run/executor/images/2 --numeric-owner -cf - . | podman import -q"),
            "{s}"
        );
        assert!(s.contains("--change 'ENV PATH=\"/usr/bin:/bin\"'"), "{s}");
        assert!(s.contains(r#"--change 'ENV Q="it'\''s \"x\""'"#), "{s}");
        assert!(!s.contains("bad key"), "{s}");
        assert!(
            s.contains(
                "--change 'WORKDIR /src' --change 'USER 1000:1000' - 'docker.io/library/alpine:3.19' >&2"
            ),
            "{s}"
        );
        assert!(s.contains("podman tag 'docker.io/library/alpine:3.19' 'alpine:3.19' >&2"), "{s}");
        assert_eq!(load_script(&[]), "set -e\n");
        let pinned = EngineImage {
            names: vec![format!("docker.io/library/node@sha256:{}", "a".repeat(64))],
            ..img2()
        };
        let s = load_script(&[pinned]);
        assert!(s.contains("is named by digest") && !s.contains("podman import"), "{s}");
    }
}
