//! `upload`: packs the paths and globs the job's `artifacts` field names (relative to the
//! workspace) into a tar.gz, refusing anything that leaves the workspace (`..`, absolute paths;
//! the tree is walked beneath the workspace and no symlink is followed), within a size cap, and
//! sends it to the coordinator with the job token.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use super::{Incomplete, JobCtx};
use crate::base::fs::Beneath;
use crate::base::redact::Redactor;
use crate::document::{ArtifactsRecord, RunDocument};
use crate::logs::LogEntry;

pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    if ctx.job.artifacts.is_empty() || doc.artifacts.as_ref().is_some_and(|a| a.uploaded) {
        return Ok(());
    }
    let ws = doc.workspace.clone().ok_or_else(|| {
        Incomplete("the run document has no workspace: run `executor prepare-workspace` first".into())
    })?;
    if let Some(sb) = &doc.sandbox {
        ctx.runtime(doc)?.sync_workspace(sb, &ws.path)?;
    }
    let mut entry = ctx.logger.entry("upload.artifacts", None)?;
    match pack_and_send(ctx, &ws.path, &mut entry) {
        Ok(record) => {
            entry.line(&format!(
                "uploaded {} files, {} bytes (sha256 {})",
                record.files.len(),
                record.bytes,
                record.sha256
            ));
            let _ = entry.finish(0);
            doc.artifacts = Some(record);
            Ok(())
        }
        Err(e) => {
            entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
            Err(e)
        }
    }
}

fn pack_and_send(ctx: &JobCtx, ws: &Path, entry: &mut LogEntry) -> Result<ArtifactsRecord> {
    let files = collect(ws, &ctx.job.artifacts, entry)?;
    let tmp_dir = ctx.settings.state_dir.join("tmp");
    std::fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("artifacts-")
        .suffix(".tar.gz")
        .tempfile_in(&tmp_dir)
        .with_context(|| format!("creating a temporary file in {}", tmp_dir.display()))?;
    let names =
        pack(ws, &files, tmp.as_file(), ctx.settings.artifacts_max_bytes, ctx.logger.redactor(), &tmp_dir)?;
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(tmp.path()).context("reopening the artifact archive")?;
    let mut buf = vec![0u8; 64 << 10];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).context("hashing the artifact archive")?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    ctx.client
        .upload_artifacts(&ctx.auth, tmp.path())
        .map_err(|e| anyhow::anyhow!("uploading the artifacts of job {}: {e}", ctx.job.id))?;
    Ok(ArtifactsRecord { files: names, bytes, sha256: hex::encode(hasher.finalize()), uploaded: true })
}

/// One component of an artifact pattern.
enum Part {
    /// `**`: this directory and every directory below it.
    AnyDirs,
    /// A name pattern (`*`, `?`, `[...]`, or a literal name).
    Name(glob::Pattern),
}

/// Expands the patterns into the regular files to pack (relative paths, sorted). The tree is
/// walked here, beneath the workspace and with lstat: a symlink is never followed, so a pattern
/// can only ever match what lies inside the workspace, and nothing else shows in a message.
fn collect(ws: &Path, patterns: &[String], entry: &mut LogEntry) -> Result<BTreeSet<PathBuf>> {
    let tree = Beneath::open(ws).context("opening the workspace")?;
    let mut out = BTreeSet::new();
    for pat in patterns {
        let p = Path::new(pat);
        if pat.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            bail!("artifact pattern {pat:?} must be relative to the workspace, without ..");
        }
        let mut parts = Vec::new();
        for c in p.components() {
            let Component::Normal(c) = c else { continue };
            let c = c.to_str().with_context(|| format!("artifact pattern {pat:?} is not UTF-8"))?;
            parts.push(if c == "**" {
                Part::AnyDirs
            } else {
                Part::Name(glob::Pattern::new(c).with_context(|| format!("artifact pattern {pat:?}"))?)
            });
        }
        let mut matched = BTreeSet::new();
        expand(&tree, &PathBuf::new(), &parts, &mut matched)
            .with_context(|| format!("artifact pattern {pat:?}"))?;
        matched.remove(Path::new(""));
        if matched.is_empty() {
            entry.line(&format!("artifact pattern {pat} matched nothing"));
        }
        for rel in matched {
            walk(&tree, &rel, &mut out, entry)?;
        }
    }
    Ok(out)
}

/// Adds to `out` the paths below the directory `base` that `parts` match; descends only into
/// real directories.
fn expand(tree: &Beneath, base: &Path, parts: &[Part], out: &mut BTreeSet<PathBuf>) -> Result<()> {
    let Some((first, rest)) = parts.split_first() else {
        out.insert(base.to_path_buf());
        return Ok(());
    };
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let children = match tree.list(base) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", shown(base))),
    };
    match first {
        Part::AnyDirs => {
            expand(tree, base, rest, out)?;
            for (name, meta) in children {
                if meta.is_dir() {
                    expand(tree, &base.join(name), parts, out)?;
                }
            }
        }
        Part::Name(p) => {
            for (name, meta) in children {
                let Some(n) = name.to_str() else { continue };
                if !p.matches_with(n, opts) {
                    continue;
                }
                if rest.is_empty() {
                    out.insert(base.join(n));
                } else if meta.is_dir() {
                    expand(tree, &base.join(n), rest, out)?;
                }
            }
        }
    }
    Ok(())
}

/// A relative path as messages show it (`.` for the workspace itself).
fn shown(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

fn walk(tree: &Beneath, rel: &Path, out: &mut BTreeSet<PathBuf>, entry: &mut LogEntry) -> Result<()> {
    let m = tree.lstat(rel).with_context(|| format!("artifact {}", rel.display()))?;
    if m.is_symlink() {
        entry.line(&format!("skipping symlink {}", rel.display()));
    } else if m.is_file() {
        out.insert(rel.to_path_buf());
    } else if m.is_dir() {
        for (c, _) in tree.list(rel).with_context(|| format!("listing {}", rel.display()))? {
            walk(tree, &rel.join(c), out, entry)?;
        }
    } else {
        entry.line(&format!("skipping {} (not a regular file)", rel.display()));
    }
    Ok(())
}

/// Copies `f` through the redactor into a temporary file: no secret leaves in an artifact either.
fn redacted_copy(mut f: std::fs::File, redactor: &Redactor, tmp_dir: &Path) -> Result<std::fs::File> {
    let mut out = tempfile::tempfile_in(tmp_dir)
        .with_context(|| format!("creating a temporary file in {}", tmp_dir.display()))?;
    let mut stream = redactor.stream();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&stream.push(&buf[..n]))?;
    }
    out.write_all(&stream.finish())?;
    out.seek(std::io::SeekFrom::Start(0))?;
    Ok(out)
}

/// Writes the tar.gz of the files, redacted; fails once they add up to more than `cap` bytes.
fn pack(
    ws: &Path,
    files: &BTreeSet<PathBuf>,
    out: &std::fs::File,
    cap: u64,
    redactor: &Redactor,
    tmp_dir: &Path,
) -> Result<Vec<String>> {
    let tree = Beneath::open(ws).context("opening the workspace")?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut total = 0u64;
    let mut names = Vec::new();
    for rel in files {
        let f = tree.open_file(rel).with_context(|| format!("opening artifact {}", rel.display()))?;
        let meta = f.metadata().with_context(|| format!("artifact {}", rel.display()))?;
        if meta.len() > cap {
            bail!("the artifacts exceed the cap of {cap} bytes (at {})", rel.display());
        }
        let f = redacted_copy(f, redactor, tmp_dir)
            .with_context(|| format!("redacting artifact {}", rel.display()))?;
        let len = f.metadata().context("artifact copy")?.len();
        total += len;
        if total > cap {
            bail!("the artifacts exceed the cap of {cap} bytes (at {})", rel.display());
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&meta);
        header.set_size(len);
        tar.append_data(&mut header, rel, f.take(len))
            .with_context(|| format!("packing {}", rel.display()))?;
        names.push(rel.display().to_string());
    }
    let gz = tar.into_inner().context("finishing the artifact archive")?;
    let mut file = gz.finish().context("finishing the artifact archive")?;
    file.flush().context("writing the artifact archive")?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::tests::MemoryLogs;
    use std::sync::Arc;

    /// Runs `collect` with a log entry and returns its result and the entry's text.
    fn collect_logged(ws: &Path, patterns: &[&str]) -> (Result<BTreeSet<PathBuf>>, String) {
        let t = Arc::new(MemoryLogs::default());
        let logger = crate::logs::JobLogger::new(
            t.clone(),
            Redactor::for_job("the-shared-secret-0123456789", &Default::default()),
            true,
        );
        let mut entry = logger.entry("upload.artifacts", None).unwrap();
        let pats: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        let res = collect(ws, &pats, &mut entry);
        entry.finish(0).unwrap();
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap_or_default();
        (res, out)
    }

    #[test]
    fn patterns_match_inside_and_never_walk_a_symlink() {
        let ws = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("hostdir")).unwrap();
        std::fs::write(host.path().join("host-secret-name.txt"), "x").unwrap();
        std::fs::write(host.path().join("hostdir/deep-host-name"), "x").unwrap();
        std::os::unix::fs::symlink(host.path(), ws.path().join("escape")).unwrap();
        std::fs::create_dir_all(ws.path().join("out/sub")).unwrap();
        std::fs::write(ws.path().join("out/a.txt"), "a").unwrap();
        std::fs::write(ws.path().join("out/.hidden.txt"), "h").unwrap();
        std::fs::write(ws.path().join("out/sub/b.txt"), "b").unwrap();
        std::fs::write(ws.path().join("out/sub/c.log"), "c").unwrap();
        std::os::unix::fs::symlink(host.path(), ws.path().join("out/sub/link")).unwrap();

        for pat in
            ["escape/*", "escape/**", "escape/host*", "escape/hostdir/*", "*/hostdir/deep*", "**/deep*"]
        {
            let (res, log) = collect_logged(ws.path(), &[pat]);
            let text = format!("{res:?} {log}");
            assert!(!text.contains("host-secret-name") && !text.contains("deep-host-name"), "{pat}: {text}");
            assert!(!text.contains(&host.path().display().to_string()), "{pat}: {text}");
            if let Ok(files) = res {
                assert!(files.is_empty(), "{pat}: {files:?}");
            }
        }

        let (res, log) = collect_logged(ws.path(), &["out/*.txt"]);
        let want: BTreeSet<PathBuf> = ["out/.hidden.txt", "out/a.txt"].iter().map(PathBuf::from).collect();
        assert_eq!(res.unwrap(), want, "{log}");
        let (res, log) = collect_logged(ws.path(), &["out/**/*.txt"]);
        let want: BTreeSet<PathBuf> =
            ["out/.hidden.txt", "out/a.txt", "out/sub/b.txt"].iter().map(PathBuf::from).collect();
        assert_eq!(res.unwrap(), want, "{log}");
        let (res, log) = collect_logged(ws.path(), &["out"]);
        let files = res.unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(log.contains("skipping symlink out/sub/link"), "{log}");
        let (res, log) = collect_logged(ws.path(), &["nothing/*"]);
        assert!(res.unwrap().is_empty());
        assert!(log.contains("matched nothing"), "{log}");
        assert!(collect_logged(ws.path(), &["../x"]).0.is_err());
        assert!(collect_logged(ws.path(), &["/etc/*"]).0.is_err());
    }
}
