//! Which caches a job gets: the ones it declares (`caches` in our job format), or, for a job that
//! declares none (every Sourcegraph job), the operator's rules mapping step images to cache
//! paths and key files (`EXECUTOR_CACHE_RULES`, a JSON file; shipped defaults for Sourcegraph's
//! indexers otherwise). Each becomes a [`CacheSpec`] whose key is the sha256 of the repository
//! (unless a rule shares the cache across repositories), the prefix, the paths, the key files'
//! content as cloned, the step images' digests and the architecture.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

use crate::protocol::{CacheDecl, Job};

/// The most caches one job gets, and paths one cache has.
const MAX_CACHES: usize = 8;
const MAX_PATHS: usize = 8;
/// The most of a key file that is hashed (a lockfile larger than this is hashed up to here).
const MAX_KEY_FILE: u64 = 256 << 20;

/// One operator rule: steps whose image matches `image` (a glob on the reference, with or
/// without `docker.io/`) cache `paths`, keyed by `files` in the step's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Rule {
    pub image: String,
    pub prefix: String,
    #[serde(default)]
    pub files: Vec<String>,
    pub paths: Vec<String>,
    /// One cache for every repository with the same key (off: each repository its own).
    #[serde(default)]
    pub share_across_repositories: bool,
}

/// The operator's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheRules(pub Vec<Rule>);

impl CacheRules {
    /// The rules of `file`, or the shipped defaults when none is set.
    pub(crate) fn load(file: Option<&Path>) -> Result<CacheRules> {
        let Some(file) = file else { return Ok(CacheRules::defaults()) };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading cache rules {}", file.display()))?;
        let rules: Vec<Rule> = serde_json::from_str(&text).with_context(|| {
            format!("cache rules {}: want a JSON list of {{image, prefix, files, paths}}", file.display())
        })?;
        for r in &rules {
            glob::Pattern::new(&r.image)
                .with_context(|| format!("cache rules {}: image {:?}", file.display(), r.image))?;
            if r.prefix.is_empty() {
                bail!("cache rules {}: the rule for {:?} has no prefix", file.display(), r.image);
            }
            check_paths(&r.paths)
                .with_context(|| format!("cache rules {}: the rule for {:?}", file.display(), r.image))?;
        }
        Ok(CacheRules(rules))
    }

    /// Sourcegraph's indexers and where their package managers keep what they download.
    pub(crate) fn defaults() -> CacheRules {
        let rule = |image: &str, prefix: &str, files: &[&str], paths: &[&str]| Rule {
            image: image.into(),
            prefix: prefix.into(),
            files: files.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            share_across_repositories: false,
        };
        CacheRules(vec![
            rule(
                "sourcegraph/scip-typescript*",
                "npm",
                &["package-lock.json", "yarn.lock", "pnpm-lock.yaml"],
                &["/root/.npm", "/usr/local/share/.cache/yarn", "/root/.local/share/pnpm"],
            ),
            rule("sourcegraph/scip-go*", "go", &["go.sum"], &["/root/go/pkg/mod", "/go/pkg/mod"]),
            rule(
                "sourcegraph/scip-python*",
                "pip",
                &["requirements.txt", "poetry.lock", "Pipfile.lock"],
                &["/root/.cache/pip"],
            ),
            rule(
                "sourcegraph/scip-java*",
                "jvm",
                &[
                    "build.gradle",
                    "build.gradle.kts",
                    "pom.xml",
                    "build.sbt",
                    "gradle/wrapper/gradle-wrapper.properties",
                ],
                &["/root/.gradle/caches", "/root/.m2/repository", "/root/.cache/coursier"],
            ),
            rule("sourcegraph/scip-ruby*", "bundler", &["Gemfile.lock"], &["/usr/local/bundle"]),
            rule("sourcegraph/scip-rust*", "cargo", &["Cargo.lock"], &["/usr/local/cargo/registry"]),
            rule("sourcegraph/scip-dotnet*", "nuget", &["packages.lock.json"], &["/root/.nuget/packages"]),
        ])
    }

    fn matching(&self, image: &str) -> Option<&Rule> {
        let short = image.strip_prefix("docker.io/").or_else(|| image.strip_prefix("index.docker.io/"));
        self.0.iter().find(|r| {
            glob::Pattern::new(&r.image)
                .is_ok_and(|p| p.matches(image) || short.is_some_and(|s| p.matches(s)))
        })
    }
}

/// One cache of one job, its key computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CacheSpec {
    /// sha256 (hex) of what the key is made of.
    pub key: String,
    /// The repository whose cache it is (`*` when a rule shares it).
    pub repository: String,
    pub prefix: String,
    /// Where it is attached: absolute in the step's root, or relative to the workspace.
    pub paths: Vec<String>,
    /// What the key was made of, for the log (`package-lock.json sha256:…`, the image digests).
    pub made_of: Vec<String>,
}

/// Whether the job gets any cache (its own declarations, or a rule matching a step image),
/// before anything is cloned or resolved.
pub(crate) fn any(job: &Job, rules: &CacheRules) -> bool {
    !job.caches.is_empty() || job.docker_steps.iter().any(|s| rules.matching(&s.image).is_some())
}

/// The job's caches, their keys computed from the workspace `ws` as cloned; `digest` gives each
/// step image's digest.
pub(crate) fn specs(
    job: &Job,
    rules: &CacheRules,
    ws: &Path,
    digest: &dyn Fn(&str) -> String,
) -> Result<Vec<CacheSpec>> {
    let arch = std::env::consts::ARCH;
    let mut out = Vec::new();
    if !job.caches.is_empty() {
        if job.caches.len() > MAX_CACHES {
            bail!("the job declares {} caches (at most {MAX_CACHES})", job.caches.len());
        }
        let mut images: Vec<String> = job.docker_steps.iter().map(|s| digest(&s.image)).collect();
        images.sort();
        images.dedup();
        for (i, CacheDecl { key, paths }) in job.caches.iter().enumerate() {
            check_paths(paths).with_context(|| format!("cache {i} of the job"))?;
            let prefix = if key.prefix.is_empty() { format!("cache{i}") } else { key.prefix.clone() };
            out.push(spec(&job.repository_name, &prefix, paths, "", &key.files, &images, arch, ws)?);
        }
        return Ok(out);
    }
    let mut seen = Vec::new();
    for step in &job.docker_steps {
        let Some(rule) = rules.matching(&step.image) else { continue };
        if seen.contains(&(&step.image, &step.dir)) {
            continue;
        }
        seen.push((&step.image, &step.dir));
        let repo = if rule.share_across_repositories { "*" } else { job.repository_name.as_str() };
        let dir = step.dir.trim_matches('/');
        out.push(spec(repo, &rule.prefix, &rule.paths, dir, &rule.files, &[digest(&step.image)], arch, ws)?);
        if out.len() == MAX_CACHES {
            break;
        }
    }
    Ok(out)
}

/// The spec of one cache: key files and relative paths are under `dir` in the workspace.
#[allow(clippy::too_many_arguments)]
fn spec(
    repository: &str,
    prefix: &str,
    paths: &[String],
    dir: &str,
    files: &[String],
    images: &[String],
    arch: &str,
    ws: &Path,
) -> Result<CacheSpec> {
    let under =
        |p: &str| if dir.is_empty() || p.starts_with('/') { p.to_string() } else { format!("{dir}/{p}") };
    let paths: Vec<String> = paths.iter().map(|p| under(p.trim_end_matches('/'))).collect();
    check_paths(&paths)?;
    let mut made_of = vec![format!("repository {repository}"), format!("prefix {prefix}")];
    made_of.extend(paths.iter().map(|p| format!("path {p}")));
    for f in files {
        let rel = under(f);
        made_of.push(format!("file {rel} {}", file_hash(ws, &rel)?));
    }
    made_of.extend(images.iter().map(|d| format!("image {d}")));
    made_of.push(format!("arch {arch}"));
    let key = hex::encode(Sha256::digest(made_of.join("\n").as_bytes()));
    Ok(CacheSpec { key, repository: repository.to_string(), prefix: prefix.to_string(), paths, made_of })
}

/// `sha256:<hex>` of the workspace file `rel` as cloned, `absent` when there is none; never
/// through a symlink out of the workspace.
fn file_hash(ws: &Path, rel: &str) -> Result<String> {
    crate::base::fs::confined(ws, rel).with_context(|| format!("cache key file {rel:?}"))?;
    let tree = crate::base::fs::Beneath::open(ws)?;
    let f = match tree.open_file(Path::new(rel)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok("absent".into()),
        Err(e) => return Ok(format!("unreadable ({})", e.kind())),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut f = f.take(MAX_KEY_FILE);
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading cache key file {rel}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Refuses a cache path that is empty, not normal, leaves the workspace, or names a place the
/// sandbox itself mounts (`/`, `/proc`, `/sys`, `/dev`, `/data`, `/tmp`).
pub(crate) fn check_paths(paths: &[String]) -> Result<()> {
    if paths.is_empty() || paths.len() > MAX_PATHS {
        bail!("a cache has 1 to {MAX_PATHS} paths, not {}", paths.len());
    }
    for p in paths {
        let trimmed = p.trim_end_matches('/');
        let rel = trimmed.strip_prefix('/').unwrap_or(trimmed);
        let normal = !rel.is_empty()
            && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && !rel.contains([',', ':', '\\', '\n', '\0']);
        if !normal {
            bail!("cache path {p:?} is not a plain path (no empty, `.` or `..` parts, commas, colons or backslashes)");
        }
        let top = rel.split('/').next().unwrap_or_default();
        if trimmed.starts_with('/') && ["proc", "sys", "dev", "data", "tmp"].contains(&top) {
            bail!("cache path {p:?} is under /{top}, which the sandbox mounts itself");
        }
        if !trimmed.starts_with('/') && top.starts_with(".executor-") {
            bail!("cache path {p:?} names the executor's own files");
        }
    }
    Ok(())
}
