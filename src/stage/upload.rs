//! `upload`: packs the paths and globs the job's `artifacts` field names (relative to the
//! workspace) into a tar.gz, refusing anything that leaves the workspace (`..`, absolute paths,
//! symlinks on the way), within a size cap, and sends it to the coordinator with the job token.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use super::{Incomplete, JobCtx};
use crate::base::redact::Redactor;
use crate::document::{ArtifactsRecord, RunDocument};
use crate::logs::LogEntry;

pub fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
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

/// Checks that `rel` has no `..`, no root, and that no component between the workspace and the
/// path itself is a symlink.
fn check_inside(ws: &Path, rel: &Path) -> Result<()> {
    let mut cur = ws.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(n) => cur.push(n),
            Component::CurDir => continue,
            _ => bail!("artifact path {} leaves the workspace", rel.display()),
        }
        let m = std::fs::symlink_metadata(&cur).with_context(|| format!("artifact {}", rel.display()))?;
        if m.file_type().is_symlink() {
            bail!(
                "artifact {} goes through the symlink {}: refusing",
                rel.display(),
                cur.strip_prefix(ws).unwrap_or(&cur).display()
            );
        }
    }
    Ok(())
}

/// Expands the patterns into the regular files to pack (relative paths, sorted).
fn collect(ws: &Path, patterns: &[String], entry: &mut LogEntry) -> Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    for pat in patterns {
        let p = Path::new(pat);
        if pat.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            bail!("artifact pattern {pat:?} must be relative to the workspace, without ..");
        }
        let full = format!("{}/{}", glob::Pattern::escape(&ws.to_string_lossy()), pat);
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let mut matched = 0;
        for m in glob::glob_with(&full, opts).with_context(|| format!("artifact pattern {pat:?}"))? {
            let m = m.with_context(|| format!("artifact pattern {pat:?}"))?;
            let rel = m
                .strip_prefix(ws)
                .with_context(|| format!("artifact {} is outside the workspace", m.display()))?
                .to_path_buf();
            check_inside(ws, &rel)?;
            matched += 1;
            walk(ws, &rel, &mut out, entry)?;
        }
        if matched == 0 {
            entry.line(&format!("artifact pattern {pat} matched nothing"));
        }
    }
    Ok(out)
}

fn walk(ws: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>, entry: &mut LogEntry) -> Result<()> {
    let full = ws.join(rel);
    let m = std::fs::symlink_metadata(&full).with_context(|| format!("artifact {}", rel.display()))?;
    if m.file_type().is_symlink() {
        entry.line(&format!("skipping symlink {}", rel.display()));
    } else if m.is_file() {
        out.insert(rel.to_path_buf());
    } else if m.is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(&full)
            .with_context(|| format!("listing {}", rel.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        children.sort();
        for c in children {
            walk(ws, &rel.join(c), out, entry)?;
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
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut total = 0u64;
    let mut names = Vec::new();
    for rel in files {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(ws.join(rel))
            .with_context(|| format!("opening artifact {}", rel.display()))?;
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
