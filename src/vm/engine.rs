//! `executor install vm --engine`: the guest's container engine, for `cliSteps` jobs (Sourcegraph's
//! `src batch exec`, which runs each batch step's container through `docker`). A Debian tree made
//! with `debootstrap` from Debian's packages (podman with its `docker` command from
//! `podman-docker`, crun, conmon, git, tar), configured to run as root inside the VM with no
//! daemon, no network of its own and no registry, then packed into one ext4 disk that every
//! `cliSteps` VM attaches read-only (docs/sandbox-microvm.md). Files live under
//! `$EXECUTOR_STATE_DIR/vm/engine`; the downloaded packages are kept there so a rebuild fetches
//! only what changed.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The Debian release the engine's tree is made from (the host's own, as in platform.md).
pub(crate) const SUITE: &str = "bookworm";
/// Where debootstrap fetches from unless `install vm --engine-mirror` names another mirror.
pub(crate) const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The packages the engine's tree holds besides debootstrap's minimal base. `netavark` only
/// satisfies containers-common's dependency on a network stack: containers share the VM's
/// network (containers.conf below), which is the job's own.
pub(crate) const PACKAGES: &[&str] =
    &["podman", "podman-docker", "netavark", "crun", "conmon", "git", "ca-certificates", "tar"];

/// What the engine's configuration changes, so that a change rebuilds the disk.
const LAYOUT: &str = "engine layout 2";

/// The files written into the tree after debootstrap: (path, contents).
pub(crate) const CONFIG_FILES: &[(&str, &str)] = &[
    (
        "etc/containers/containers.conf",
        "# Written by `executor install vm --engine`: podman as root inside a microVM.\n\
         [containers]\n\
         # The VM is the boundary, and its network is the job's: containers share it.\n\
         netns = \"host\"\n\
         log_driver = \"k8s-file\"\n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         runtime = \"crun\"\n\
         [network]\n\
         # netavark, not the CNI plugins this tree does not have (containers use no network\n\
         # of their own, but podman reads the backend's configuration at every start).\n\
         network_backend = \"netavark\"\n",
    ),
    (
        "etc/containers/storage.conf",
        "# Written by `executor install vm --engine`: the store is on the job's workspace disk.\n\
         [storage]\n\
         driver = \"overlay\"\n\
         runroot = \"/run/containers/storage\"\n\
         graphroot = \"/var/lib/containers/storage\"\n",
    ),
    (
        "etc/containers/registries.conf.d/50-executor.conf",
        "# Written by `executor install vm --engine`: short names mean Docker Hub, as with docker.\n\
         unqualified-search-registries = [\"docker.io\"]\n\
         short-name-mode = \"permissive\"\n",
    ),
    // podman-docker's `docker` says on every call that it is podman, unless this exists.
    ("etc/containers/nodocker", ""),
];

/// What the engine install recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EngineManifest {
    /// The ext4 disk of the engine's tree.
    pub disk: PathBuf,
    /// `podman --version` in the tree.
    pub podman: String,
    /// The packages and layout the disk was built from.
    pub inputs: String,
}

pub(crate) fn engine_dir(state_dir: &Path) -> PathBuf {
    super::vm_dir(state_dir).join("engine")
}

fn manifest_path(state_dir: &Path) -> PathBuf {
    engine_dir(state_dir).join("manifest.json")
}

/// The installed engine, or an error saying how to install it.
pub(crate) fn installed(state_dir: &Path) -> Result<EngineManifest> {
    let path = manifest_path(state_dir);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no container engine for the guest at {} (run `executor install vm --engine`)",
            path.display()
        )
    })?;
    let m: EngineManifest =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    if !m.disk.is_file() {
        bail!("{} is missing (run `executor install vm --engine`)", m.disk.display());
    }
    Ok(m)
}

fn run(cmd: &mut std::process::Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!("{what} failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join("; "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes [`CONFIG_FILES`] into `root`.
pub(crate) fn write_config(root: &Path) -> Result<()> {
    for (rel, text) in CONFIG_FILES {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Makes an ext4 image of `dir` at `out`, sized for it with room to spare.
pub(crate) fn mkfs_of(dir: &Path, out: &Path, label: &str) -> Result<()> {
    let used = run(crate::base::proc::command("du").args(["-sxb"]).arg(dir), "du")?;
    let bytes: u64 = used.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let size = (bytes * 5 / 4 + (96 << 20)).next_multiple_of(1 << 20);
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(size).with_context(|| format!("sizing {}", out.display()))?;
    drop(f);
    run(
        crate::base::proc::command("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-O", "^has_journal", "-m", "0", "-N", "200000", "-d"])
            .arg(dir)
            .arg(out),
        "mkfs.ext4 (install e2fsprogs)",
    )?;
    Ok(())
}

/// Installs or refreshes the engine's disk; returns what it did, one line each.
pub(crate) fn install(state_dir: &Path, mirror: &str, force: bool) -> Result<Vec<String>> {
    let dir = engine_dir(state_dir);
    let debs = dir.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    if !nix::unistd::geteuid().is_root() {
        bail!("building the guest's container engine needs root (debootstrap)");
    }
    which::which("debootstrap").context("debootstrap not found (install the debootstrap package)")?;
    let inputs = format!("{LAYOUT} {SUITE} {}", PACKAGES.join(","));
    if let Ok(m) = installed(state_dir) {
        if m.inputs == inputs && !force {
            return Ok(vec![format!("engine: up to date at {} ({})", m.disk.display(), m.podman)]);
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(".root-")
        .tempdir_in(&dir)
        .with_context(|| format!("creating a temporary directory in {}", dir.display()))?;
    let root = tmp.path().join("root");
    run(
        crate::base::proc::Inherit::inherit(
            &mut crate::base::proc::command("debootstrap"),
            crate::base::proc::PROXY,
        )
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([SUITE])
        .arg(&root)
        .arg(mirror),
        "debootstrap",
    )
    .with_context(|| format!("making the engine's Debian tree from {mirror}"))?;
    write_config(&root)?;
    // What apt keeps about the build is not the guest's business, and costs disk in every VM.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = root.join(d);
        if let Ok(rd) = fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    for d in ["usr/local/bin", "var/lib/containers", "run/executor/images"] {
        fs::create_dir_all(root.join(d)).with_context(|| format!("creating /{d} in the engine's tree"))?;
    }
    let podman = run(
        crate::base::proc::command("chroot").arg(&root).args(["podman", "--version"]),
        "podman --version in the engine's tree",
    )?
    .trim()
    .to_string();
    let stamp = &hex::encode(sha2::Sha256::digest(format!("{inputs} {podman}").as_bytes()))[..16];
    let disk = dir.join(format!("engine-{stamp}.ext4"));
    let tmp_disk = dir.join(format!(".engine-{stamp}.ext4"));
    mkfs_of(&root, &tmp_disk, "engine")?;
    fs::rename(&tmp_disk, &disk).with_context(|| format!("installing {}", disk.display()))?;
    let old = installed(state_dir).ok();
    let m = EngineManifest { disk: disk.clone(), podman: podman.clone(), inputs };
    let text = serde_json::to_vec_pretty(&m).context("encoding the engine manifest")?;
    crate::base::fs::write_atomic(&manifest_path(state_dir), &text)?;
    if let Some(o) = old.filter(|o| o.disk != disk) {
        let _ = fs::remove_file(&o.disk);
    }
    Ok(vec![format!("engine: built {} ({podman}) from Debian {SUITE}", disk.display())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_configuration_keeps_containers_on_the_vm_s_network_with_no_daemon() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path()).unwrap();
        let conf = fs::read_to_string(tmp.path().join("etc/containers/containers.conf")).unwrap();
        assert!(conf.contains("netns = \"host\""), "{conf}");
        assert!(conf.contains("cgroup_manager = \"cgroupfs\""), "{conf}");
        assert!(tmp.path().join("etc/containers/nodocker").is_file());
        let reg =
            fs::read_to_string(tmp.path().join("etc/containers/registries.conf.d/50-executor.conf")).unwrap();
        assert!(reg.contains("docker.io"), "{reg}");
        assert!(PACKAGES.contains(&"podman-docker"));
    }
}
