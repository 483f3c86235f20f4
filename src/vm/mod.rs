//! `executor install vm`: what a microVM needs, from Debian's packages only. The guest kernel
//! (a `linux-image-*-cloud-amd64` package fetched with `apt-get download` and unpacked with
//! `dpkg -x`, its LZ4 `vmlinuz` unpacked to an uncompressed `vmlinux` for a fast PVH boot) and an
//! initramfs holding the guest agent (the small `executor-guest-agent` binary installed beside
//! this one, with its shared libraries), busybox and the virtio modules. Files live under `$EXECUTOR_STATE_DIR/vm`; running it again does only what is
//! out of date.

pub(crate) mod cpio;
pub(crate) mod engine;
pub(crate) mod src_cli;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The metapackage whose dependency names the current cloud kernel.
pub(crate) const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// The guest agent's binary name; it is built by cargo with `executor` and installed beside it
/// (or in `../lib/executor/` relative to it, as the .deb does).
pub(crate) const AGENT_BINARY: &str = "executor-guest-agent";

/// Modules the guest loads only once it answered the host (listed in `late`): what no device
/// needs, only steps (their image root is an overlay).
pub(crate) const LATE_MODULES: &[&str] = &["overlay"];

/// Modules the guest loads only for a job network, in this order (listed in `net`; guest/net.rs).
pub(crate) const NET_MODULES: &[&str] = &["failover", "net_failover", "virtio_net"];

/// Modules the guest loads, in this order (the package ships no modules.dep).
pub(crate) const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "overlay",
    "failover",
    "net_failover",
    "virtio_net",
];

/// What `install vm` recorded: where the kernel and initramfs are and what they were built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub kernel_package: String,
    pub kernel_version: String,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// sha256 over everything the initramfs was built from.
    pub initramfs_inputs: String,
}

pub(crate) fn vm_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vm")
}

fn manifest_path(state_dir: &Path) -> PathBuf {
    vm_dir(state_dir).join("manifest.json")
}

/// The installed kernel and initramfs, or an error saying to run `executor install vm`.
pub(crate) fn installed(state_dir: &Path) -> Result<Manifest> {
    let path = manifest_path(state_dir);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("no guest kernel at {} (run `executor install vm`)", path.display()))?;
    let m: Manifest = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    for f in [&m.vmlinux, &m.initramfs] {
        if !f.is_file() {
            bail!("{} is missing (run `executor install vm`)", f.display());
        }
    }
    Ok(m)
}

/// Settings of `install vm`.
#[derive(Debug, Clone)]
pub(crate) struct InstallOptions {
    pub state_dir: PathBuf,
    /// A `linux-image-*` package, or the metapackage to resolve.
    pub kernel_package: String,
    /// Rebuild even what is up to date.
    pub force: bool,
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resolves a metapackage to the versioned `linux-image-<version>-cloud-amd64` it depends on.
fn resolve_kernel_package(name: &str) -> Result<String> {
    if name.starts_with("linux-image-") && name.chars().nth(12).is_some_and(|c| c.is_ascii_digit()) {
        return Ok(name.to_string());
    }
    let out = run_cmd(
        crate::base::proc::command("apt-cache").args(["depends", name]),
        &format!("apt-cache depends {name}"),
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-") && d.chars().nth(12).is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .with_context(|| format!("package {name} names no linux-image-<version> package"))
}

/// Finds the LZ4 (legacy frame) payload of a bzImage and decompresses it to an ELF vmlinux.
pub(crate) fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let data = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    const LZ4_LEGACY: &[u8] = &[0x02, 0x21, 0x4c, 0x18];
    let mut from = 0;
    while let Some(pos) = data[from..].windows(4).position(|w| w == LZ4_LEGACY) {
        let at = from + pos;
        let mut child = crate::base::proc::command("lz4")
            .args(["-dc"])
            .stdin(Stdio::piped())
            .stdout(fs::File::create(out).with_context(|| format!("creating {}", out.display()))?)
            .stderr(Stdio::null())
            .spawn()
            .context("running lz4 (install the lz4 package)")?;
        if let Some(mut stdin) = child.stdin.take() {
            // lz4 stops reading at the end of its frame; the kernel's trailer is not ours to judge.
            let _ = stdin.write_all(&data[at..]);
        }
        let _ = child.wait();
        let head = fs::read(out).map(|b| b.get(..4).map(|h| h.to_vec())).unwrap_or_default();
        if head.as_deref() == Some(b"\x7fELF") {
            return Ok(());
        }
        from = at + 1;
    }
    bail!("no LZ4 kernel payload found in {}", vmlinuz.display())
}

fn sha256_file(h: &mut Sha256, path: &Path) -> Result<()> {
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    Ok(())
}

/// The shared libraries `ldd` names for `exe`, as absolute paths.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = crate::base::proc::command("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("running ldd on {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The guest agent binary that belongs to the running executor.
pub(crate) fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().with_context(|| format!("{} has no directory", exe.display()))?;
    let candidates = [dir.join(AGENT_BINARY), dir.join("../lib/executor").join(AGENT_BINARY)];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no guest agent binary {AGENT_BINARY} beside {} or in {} (cargo builds it with executor)",
            exe.display(),
            dir.join("../lib/executor").display()
        )
    })
}

fn busybox() -> Result<PathBuf> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox"];
    for c in candidates {
        let p = Path::new(c);
        if p.is_file() {
            let out = crate::base::proc::command("ldd").arg(p).output();
            let dynamic = out.map(|o| String::from_utf8_lossy(&o.stdout).contains("=>")).unwrap_or(false);
            if !dynamic {
                return Ok(p.to_path_buf());
            }
        }
    }
    bail!("no static busybox found at /bin/busybox (install the busybox-static package)")
}

/// The agent without symbols or debug information (a debug build carries tens of MB of it: the
/// guest kernel unpacks every byte), when `strip` is there; the binary as it is otherwise.
fn stripped(agent: &Path) -> Result<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let ok = crate::base::proc::command("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(tmp.path())
        .arg(agent)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let from = if ok { tmp.path() } else { agent };
    fs::read(from).with_context(|| format!("reading {}", from.display()))
}

/// A kernel module without its appended signature. The guest kernel then loads it without the
/// RSA check (and marks itself tainted), which costs about 100 ms of boot under TCG. The check
/// adds nothing here: apt verified the package the modules come from, and the guest kernel is
/// no boundary of ours (the job is root in the guest).
pub(crate) fn without_signature(module: &[u8]) -> &[u8] {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    // struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len (BE).
    const INFO: usize = 12;
    let Some(body) = module.strip_suffix(MAGIC) else { return module };
    if body.len() < INFO {
        return module;
    }
    let info = &body[body.len() - INFO..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match (body.len() - INFO).checked_sub(sig_len) {
        Some(end) => &body[..end],
        None => module,
    }
}

/// Builds the initramfs: the agent as /init, its libraries, busybox, the modules.
fn build_initramfs(
    out: &Path,
    agent: &Path,
    libs: &[PathBuf],
    busybox: &Path,
    modules: &[PathBuf],
) -> Result<()> {
    // Uncompressed: under TCG, inflating in the guest costs more than QEMU copying the bytes.
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(
        fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    ));
    let mut dirs: Vec<String> = vec![
        "bin".into(),
        "dev".into(),
        "proc".into(),
        "sys".into(),
        "run".into(),
        "tmp".into(),
        "data".into(),
        "images".into(),
        "lib".into(),
        "lib/modules".into(),
        "lib/modules/executor".into(),
    ];
    for lib in libs {
        let mut p = PathBuf::new();
        if let Some(parent) = lib.parent() {
            for c in parent.components().skip(1) {
                p.push(c);
                let s = p.to_string_lossy().into_owned();
                if !dirs.contains(&s) {
                    dirs.push(s);
                }
            }
        }
    }
    let io = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", out.display());
    for d in &dirs {
        w.dir(d).map_err(io)?;
    }
    let agent_bytes = stripped(agent)?;
    w.file("init", 0o755, &agent_bytes).map_err(io)?;
    for lib in libs {
        let bytes = fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        let name = lib.to_string_lossy();
        w.file(name.trim_start_matches('/'), 0o755, &bytes).map_err(io)?;
    }
    let bb = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    w.file("bin/busybox", 0o755, &bb).map_err(io)?;
    for applet in ["sh", "cat", "echo", "ls", "poweroff", "uname", "sleep", "true"] {
        w.symlink(&format!("bin/{applet}"), "busybox").map_err(io)?;
    }
    let (mut order, mut late, mut net) = (String::new(), String::new(), String::new());
    for m in modules {
        let name = m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = fs::read(m).with_context(|| format!("reading {}", m.display()))?;
        w.file(&format!("lib/modules/executor/{name}"), 0o644, without_signature(&bytes)).map_err(io)?;
        let list = if LATE_MODULES.iter().any(|l| name == format!("{l}.ko")) {
            &mut late
        } else if NET_MODULES.iter().any(|l| name == format!("{l}.ko")) {
            &mut net
        } else {
            &mut order
        };
        list.push_str(&name);
        list.push('\n');
    }
    w.file("lib/modules/executor/order", 0o644, order.as_bytes()).map_err(io)?;
    w.file("lib/modules/executor/late", 0o644, late.as_bytes()).map_err(io)?;
    w.file("lib/modules/executor/net", 0o644, net.as_bytes()).map_err(io)?;
    let mut f = w.finish().map_err(io)?;
    f.flush().map_err(io)?;
    Ok(())
}

/// Installs or refreshes the guest kernel and initramfs; returns what it did, one line each.
pub(crate) fn install(opts: &InstallOptions) -> Result<Vec<String>> {
    let dir = vm_dir(&opts.state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut did = Vec::new();
    let old: Option<Manifest> =
        fs::read_to_string(manifest_path(&opts.state_dir)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let package = resolve_kernel_package(&opts.kernel_package)?;
    let version = package
        .strip_prefix("linux-image-")
        .map(str::to_string)
        .with_context(|| format!("{package} is not a linux-image package"))?;
    let kdir = dir.join("kernel").join(&version);
    let vmlinux = kdir.join("vmlinux");
    let mod_dir = kdir.join("modules");
    let have_kernel = vmlinux.is_file() && MODULES.iter().all(|m| mod_dir.join(format!("{m}.ko")).is_file());
    if have_kernel && !opts.force {
        did.push(format!("kernel {version}: already installed at {}", vmlinux.display()));
    } else {
        let tmp = tempfile::Builder::new()
            .prefix(".kernel-")
            .tempdir_in(&dir)
            .with_context(|| format!("creating a temporary directory in {}", dir.display()))?;
        run_cmd(
            crate::base::proc::Inherit::inherit(
                &mut crate::base::proc::command("apt-get"),
                crate::base::proc::PROXY,
            )
            .arg("download")
            .arg(&package)
            .current_dir(tmp.path()),
            "apt-get download",
        )
        .with_context(|| format!("downloading {package}"))?;
        let deb = fs::read_dir(tmp.path())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb for {package}"))?;
        let root = tmp.path().join("root");
        run_cmd(crate::base::proc::command("dpkg").arg("-x").arg(&deb).arg(&root), "dpkg -x")?;
        fs::create_dir_all(&mod_dir).with_context(|| format!("creating {}", mod_dir.display()))?;
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
        let tmp_vmlinux = kdir.join("vmlinux.tmp");
        extract_vmlinux(&vmlinuz, &tmp_vmlinux)?;
        let kmods = root.join("lib/modules").join(&version).join("kernel");
        for m in MODULES {
            let found = find_file(&kmods, &format!("{m}.ko"))
                .with_context(|| format!("module {m} not found in {package}"))?;
            fs::copy(&found, mod_dir.join(format!("{m}.ko")))
                .with_context(|| format!("copying module {m}"))?;
        }
        fs::rename(&tmp_vmlinux, &vmlinux).with_context(|| format!("installing {}", vmlinux.display()))?;
        did.push(format!("kernel {version}: downloaded {package} and unpacked {}", vmlinux.display()));
    }
    let agent = agent_binary()?;
    let libs = shared_libraries(&agent)?;
    let bb = busybox()?;
    let modules: Vec<PathBuf> = MODULES.iter().map(|m| mod_dir.join(format!("{m}.ko"))).collect();
    let mut h = Sha256::new();
    // What the build does to its inputs (2: the small agent binary, modules without signatures;
    // 3: the late modules; 4: the network modules).
    h.update(b"initramfs layout 4");
    h.update(version.as_bytes());
    for f in std::iter::once(&agent).chain(&libs).chain(std::iter::once(&bb)).chain(&modules) {
        sha256_file(&mut h, f)?;
    }
    let inputs = hex::encode(h.finalize());
    let initramfs = dir.join(format!("initramfs-{}.cpio", &inputs[..16]));
    if !opts.force && initramfs.is_file() && old.as_ref().is_some_and(|m| m.initramfs_inputs == inputs) {
        did.push(format!("initramfs: up to date at {}", initramfs.display()));
    } else {
        let tmp = initramfs.with_extension("tmp");
        build_initramfs(&tmp, &agent, &libs, &bb, &modules)?;
        fs::rename(&tmp, &initramfs).with_context(|| format!("installing {}", initramfs.display()))?;
        did.push(format!(
            "initramfs: built {} (agent {}, {} libraries)",
            initramfs.display(),
            agent.display(),
            libs.len()
        ));
    }
    if let Some(o) = &old {
        if o.initramfs != initramfs && o.initramfs.starts_with(&dir) {
            let _ = fs::remove_file(&o.initramfs);
        }
    }
    let m = Manifest {
        kernel_package: package,
        kernel_version: version,
        vmlinux,
        initramfs,
        initramfs_inputs: inputs,
    };
    let text = serde_json::to_vec_pretty(&m).context("encoding the vm manifest")?;
    crate::base::fs::write_atomic(&manifest_path(&opts.state_dir), &text)?;
    did.push(ensure_vm_user()?);
    Ok(did)
}

/// The system account QEMU runs as when the executor runs as root.
pub(crate) const VM_USER: &str = "executor-vm";

/// Creates [`VM_USER`] (no home, no shell, its own group) when running as root; says what it did.
fn ensure_vm_user() -> Result<String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok("vm user: not root, QEMU runs as the invoking user".into());
    }
    if let Ok(Some(u)) = nix::unistd::User::from_name(VM_USER) {
        return Ok(format!("vm user: {VM_USER} (uid {}) already exists", u.uid));
    }
    run_cmd(
        crate::base::proc::command("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            VM_USER,
        ]),
        "useradd",
    )
    .with_context(|| format!("creating the system user {VM_USER}"))?;
    let u = nix::unistd::User::from_name(VM_USER)
        .ok()
        .flatten()
        .with_context(|| format!("useradd did not create {VM_USER}"))?;
    Ok(format!("vm user: created system user {VM_USER} (uid {}); QEMU runs as it", u.uid))
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let ft = e.file_type().ok()?;
        if ft.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if e.file_name().to_str() == Some(name) {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_signature_is_cut_off_and_anything_else_is_left_alone() {
        let mut signed = b"\x7fELF module body".to_vec();
        let sig = vec![0xab; 681];
        signed.extend(&sig);
        signed.extend([0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend(681u32.to_be_bytes());
        signed.extend(b"~Module signature appended~\n");
        assert_eq!(without_signature(&signed), b"\x7fELF module body");
        assert_eq!(without_signature(b"\x7fELF unsigned"), b"\x7fELF unsigned");
        // A signature length longer than the file leaves the file as it is.
        let mut bad = b"x".to_vec();
        bad.extend([0, 0, 2, 0, 0, 0, 0, 0]);
        bad.extend(4096u32.to_be_bytes());
        bad.extend(b"~Module signature appended~\n");
        assert_eq!(without_signature(&bad), &bad[..]);
    }
}
