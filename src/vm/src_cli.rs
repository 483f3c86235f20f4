//! `executor install src-cli`: the `src` binary a `cliSteps` job runs in the guest (Sourcegraph's
//! src-cli, which every instance serves at `/.api/src-cli/src_linux_amd64`). Checked against the
//! instance's `.sha256` when it offers one, kept under `$EXECUTOR_STATE_DIR/vm/src-cli`, and
//! packed into a small ext4 disk (`/usr/local/bin/src`) that a `cliSteps` VM stacks above the
//! engine's (engine.rs).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The route every Sourcegraph instance serves src-cli's Linux binary at.
pub(crate) const SRC_ROUTE: &str = "/.api/src-cli/src_linux_amd64";

/// What `install src-cli` recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SrcManifest {
    pub binary: PathBuf,
    /// The disk holding it at `/usr/local/bin/src`.
    pub disk: PathBuf,
    pub sha256: String,
    /// What `src version -client-only` said (empty when it could not say).
    pub version: String,
    /// Where it came from (a URL or a file).
    pub source: String,
}

pub(crate) fn src_dir(state_dir: &Path) -> PathBuf {
    super::vm_dir(state_dir).join("src-cli")
}

fn manifest_path(state_dir: &Path) -> PathBuf {
    src_dir(state_dir).join("manifest.json")
}

/// The installed `src`, or an error saying how to install it.
pub(crate) fn installed(state_dir: &Path) -> Result<SrcManifest> {
    let path = manifest_path(state_dir);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("no src-cli at {} (run `executor install src-cli`)", path.display()))?;
    let m: SrcManifest =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    for f in [&m.binary, &m.disk] {
        if !f.is_file() {
            bail!("{} is missing (run `executor install src-cli`)", f.display());
        }
    }
    Ok(m)
}

/// The hex digest a `.sha256` file carries (`<hex>` or `<hex>  <name>`), lowercased.
pub(crate) fn parse_sha256(text: &str) -> Result<String> {
    let hex = text.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the checksum {:?} is not a sha256 hex digest", text.chars().take(80).collect::<String>());
    }
    Ok(hex)
}

/// The version `src version -client-only` prints (`Current version: 5.2.1`), if it runs within
/// a few seconds.
pub(crate) fn version_of(binary: &Path) -> String {
    let child = crate::base::proc::command(binary)
        .args(["version", "-client-only"])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return String::new() };
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return String::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.by_ref().take(4096).read_to_string(&mut out);
    }
    let line = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    line.strip_prefix("Current version:").unwrap_or(line).trim().chars().take(100).collect()
}

/// Installs `bytes` as `src` (checked against `want_sha256` when given) and builds its disk;
/// returns what it did, one line each.
pub(crate) fn install(
    state_dir: &Path,
    bytes: &[u8],
    want_sha256: Option<&str>,
    source: &str,
) -> Result<Vec<String>> {
    let got = hex::encode(Sha256::digest(bytes));
    let mut did = Vec::new();
    match want_sha256 {
        Some(want) if want != got => bail!(
            "src-cli from {source} does not match its checksum: sha256 {got}, expected {want}; nothing installed"
        ),
        Some(_) => did.push(format!("src-cli: sha256 {got} matches the checksum {source} offers")),
        None => did.push(format!("src-cli: sha256 {got} (no checksum offered; not checked)")),
    }
    if bytes.len() < 4 {
        bail!("src-cli from {source} is {} bytes: not a program", bytes.len());
    }
    let dir = src_dir(state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = &got[..16];
    let tree = tempfile::Builder::new()
        .prefix(".tree-")
        .tempdir_in(&dir)
        .with_context(|| format!("creating a temporary directory in {}", dir.display()))?;
    let bin_dir = tree.path().join("usr/local/bin");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let in_tree = bin_dir.join("src");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&in_tree)
            .with_context(|| format!("creating {}", in_tree.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", in_tree.display()))?;
    }
    let binary = dir.join(format!("src-{stem}"));
    let disk = dir.join(format!("src-{stem}.ext4"));
    let tmp_disk = dir.join(format!(".src-{stem}.ext4"));
    super::engine::mkfs_of(tree.path(), &tmp_disk, "src-cli")?;
    fs::copy(&in_tree, &binary).with_context(|| format!("installing {}", binary.display()))?;
    fs::rename(&tmp_disk, &disk).with_context(|| format!("installing {}", disk.display()))?;
    let version = version_of(&binary);
    let old = installed(state_dir).ok();
    let m = SrcManifest {
        binary: binary.clone(),
        disk,
        sha256: got,
        version: version.clone(),
        source: source.into(),
    };
    let text = serde_json::to_vec_pretty(&m).context("encoding the src-cli manifest")?;
    crate::base::fs::write_atomic(&manifest_path(state_dir), &text)?;
    if let Some(o) = old.filter(|o| o.binary != m.binary) {
        let _ = fs::remove_file(&o.binary);
        let _ = fs::remove_file(&o.disk);
    }
    did.push(format!(
        "src-cli: installed {} (version {})",
        binary.display(),
        if version.is_empty() { "unknown" } else { &version }
    ));
    Ok(did)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_read_in_both_forms_and_a_mismatch_installs_nothing() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_sha256(&format!("{hex}\n")).unwrap(), hex);
        assert_eq!(parse_sha256(&format!("{}  src_linux_amd64\n", hex.to_uppercase())).unwrap(), hex);
        assert!(parse_sha256("<html>not found</html>").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let err = install(tmp.path(), b"#!/bin/sh\n", Some(&hex), "test").unwrap_err().to_string();
        assert!(err.contains("does not match its checksum"), "{err}");
        assert!(installed(tmp.path()).is_err());
        assert!(!src_dir(tmp.path()).exists(), "nothing was written");
    }
}
