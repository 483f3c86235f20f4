//! `executor image pull`: an image from a registry becomes a tree in the store. The manifest
//! (Docker v2 schema 2 or OCI; a manifest list or OCI index picks this host's linux platform) and
//! every blob are verified against their digests while they stream in; layers (gzip, zstd or
//! plain tar, decompressed once as their media type says) are kept content-addressed under
//! `blobs/` and shared between images (see [`super::blob`]), then applied with whiteouts by
//! [`super::import::apply_layer`] under a cap on the tar bytes the layers unpack to.
//!
//! A pull stops at the job's cancel, at its own deadline (`EXECUTOR_IMAGE_PULL_TIMEOUT`, or the
//! job's when sooner) and when a transfer is slower than [`super::blob::MIN_RATE`]. An image a
//! pull needed the job's own credentials for is marked private: a later job gets it only after
//! the registry accepted that job's credentials for it (see [`pull`]).

use std::cell::Cell;
use std::fs;
use std::io::Read;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::blob::{self, Budget, Pace, Wanted};
use super::layer::{compression, decompress};
use super::registry::{self, ImageName, RegistryOptions, Session, Stop};
use super::{ImageMeta, ImageStore, ResolvedImage};
use crate::base::cancel::Cancel;

/// The largest manifest, index or config accepted.
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;
/// The most layers an image may have (Docker's own limit is 127 for overlay storage).
pub(crate) const MAX_LAYERS: usize = 500;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// When `vm-boot` pulls a job's images (`EXECUTOR_IMAGE_PULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum PullPolicy {
    /// Only images the store lacks (the default).
    #[default]
    Missing,
    /// Every image, every job (the store still skips layers it has).
    Always,
    /// Never: an image not in the store fails the job.
    Never,
}

impl PullPolicy {
    pub(crate) fn parse(s: &str) -> Result<PullPolicy> {
        match s.trim() {
            "" | "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => bail!("EXECUTOR_IMAGE_PULL {other:?} is not one of missing, always, never"),
        }
    }
}

/// The executor's registry settings, validated; the job's own credentials join them per pull.
#[derive(Debug, Clone, Default)]
pub struct PullSettings {
    /// `EXECUTOR_DOCKER_AUTH_CONFIG`: a Docker config.json (checked when the settings load).
    pub docker_auth_config: Option<crate::base::secret::Secret>,
    pub mirrors: Vec<String>,
    pub insecure: Vec<String>,
    /// `EXECUTOR_PRIVATE_REGISTRIES`: registries that may be at non-public addresses.
    pub private: Vec<String>,
    pub ca: Option<std::path::PathBuf>,
    pub max_unpacked: u64,
    /// `EXECUTOR_IMAGE_PULL_TIMEOUT`: the most one pull may take.
    pub timeout: Duration,
}

impl PullSettings {
    /// Validates the raw values (the auth config parses, the size is a size).
    pub fn new(
        docker_auth_config: Option<&str>,
        mirrors: &[String],
        insecure: &[String],
        ca: Option<&std::path::Path>,
        max_size: Option<&str>,
    ) -> Result<PullSettings> {
        let docker_auth_config =
            docker_auth_config.filter(|t| !t.trim().is_empty()).map(crate::base::secret::Secret::new);
        if let Some(text) = &docker_auth_config {
            super::registry::Credentials::default()
                .add_config_text(text.expose(), "EXECUTOR_DOCKER_AUTH_CONFIG")?;
        }
        let max = max_size.unwrap_or("32G");
        let max_unpacked = crate::base::units::parse_size(max)
            .map_err(|e| anyhow::anyhow!("EXECUTOR_IMAGE_MAX_SIZE {max:?}: {e}"))?;
        let list = |v: &[String]| -> Vec<String> {
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Ok(PullSettings {
            docker_auth_config,
            mirrors: list(mirrors),
            insecure: list(insecure),
            private: Vec::new(),
            ca: ca.map(|p| p.to_path_buf()),
            max_unpacked,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The options of one pull; the job's docker auth config (v2 payloads) wins over the
    /// executor's.
    pub fn options(&self, job_auth: Option<&serde_json::Value>) -> Result<PullOptions> {
        let mut credentials = super::registry::Credentials::default();
        if let Some(job) = job_auth {
            credentials.add_job_config(job, "the job's docker auth config")?;
        }
        if let Some(text) = &self.docker_auth_config {
            credentials.add_config_text(text.expose(), "EXECUTOR_DOCKER_AUTH_CONFIG")?;
        }
        Ok(PullOptions {
            registry: RegistryOptions {
                credentials,
                mirrors: self.mirrors.clone(),
                insecure: self.insecure.clone(),
                private: self.private.clone(),
                ca: self.ca.clone(),
                ..Default::default()
            },
            max_unpacked: self.max_unpacked,
            always: false,
            timeout: self.timeout,
            deadline: None,
        })
    }
}

/// What a pull may do.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub registry: RegistryOptions,
    /// The cap on the bytes an image's layers unpack to (a decompression bomb stops here).
    pub max_unpacked: u64,
    /// Download again even when the store already has the tag.
    pub always: bool,
    /// The most one pull may take.
    pub timeout: Duration,
    /// The job's deadline, when sooner.
    pub deadline: Option<Instant>,
}

/// A pull's deadline when nobody sets one.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A finished pull.
#[derive(Debug, Clone)]
pub(crate) struct Pulled {
    /// `registry/repository:tag` (or `@digest`).
    pub reference: String,
    /// The digest the reference resolved to (an index's when the tag names an index).
    pub digest: String,
    /// Bytes downloaded (0 when everything was in the store).
    pub bytes: u64,
    pub elapsed: Duration,
    /// The registry (or mirror) it came from.
    pub registry: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// This host's architecture as images name it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

fn check_digest(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => {
            Ok(h)
        }
        _ => bail!("unsupported or malformed digest {digest:?} (want sha256:<64 hex digits>)"),
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pulls `reference` into `store` and names it by its canonical reference (and, for a tag, by
/// `name@digest` too). A stored image that is marked private (pulled with a job's own
/// credentials) is served only after the registry accepted this pull's credentials for its
/// manifest. `cancel` is the job's: the pull stops when it fires.
pub(crate) fn pull(
    store: &ImageStore,
    reference: &str,
    opts: &PullOptions,
    cancel: &Cancel,
) -> Result<Pulled> {
    let name = ImageName::parse(reference)?;
    let canonical = name.canonical();
    let started = Instant::now();
    let own = started + opts.timeout;
    let stop = Stop { cancel: cancel.clone(), deadline: Some(opts.deadline.map_or(own, |d| d.min(own))) };
    // One pull of an image at a time across processes; the second finds the first's work.
    let lock_name = hex::encode(Sha256::digest(canonical.as_bytes()));
    let lock_path = store.dir().join("locks").join(lock_name);
    let _lock = loop {
        if let Some(held) = crate::base::lock::try_lock(&lock_path)? {
            break held;
        }
        if !stop.sleep(Duration::from_millis(200)) {
            bail!(
                "pulling {canonical}: stopped while another pull of it held its lock ({})",
                stop.reason().unwrap_or_default()
            );
        }
    };
    let stored = if opts.always { None } else { store.resolve(&canonical).ok() };
    if stored.as_ref().is_some_and(|image| !store.is_private(&image.digest)) {
        let image = stored.as_ref().map(|i| i.digest.clone()).unwrap_or_default();
        return Ok(Pulled {
            reference: canonical,
            digest: name.digest.clone().unwrap_or(image),
            bytes: 0,
            elapsed: started.elapsed(),
            registry: name.registry.clone(),
        });
    }
    let agent = registry::agent(&opts.registry)?;
    let endpoints = registry::endpoints(&agent, &name, &opts.registry);
    let mut last = None;
    for (i, base) in endpoints.iter().enumerate() {
        let session = Session::new(&agent, base, &name, &opts.registry).with_stop(stop.clone());
        let result = match &stored {
            Some(image) => authorised(&session, &name).map(|_| (image.digest.clone(), 0)),
            None => pull_from(store, &session, &name, opts).map(|(_, d, b)| (d, b)),
        };
        match result {
            Ok((digest, bytes)) => {
                if session.sent_job_credentials() {
                    store.mark_private(&canonical)?;
                }
                return Ok(Pulled {
                    reference: canonical,
                    digest: if stored.is_some() { name.digest.clone().unwrap_or(digest) } else { digest },
                    bytes,
                    elapsed: started.elapsed(),
                    registry: session.registry.clone(),
                });
            }
            Err(e) => {
                let stopped = session.stopped().is_some();
                if i + 1 < endpoints.len() && !stopped {
                    tracing::warn!(target: "pull", "{canonical}: {} failed, trying the next: {e:#}", session.registry);
                }
                let what = if stored.is_some() { "checking this job's access to" } else { "pulling" };
                last = Some(e.context(format!("{what} {canonical} from {}", session.registry)));
                if stopped {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("pulling {canonical}: no registry to ask")))
}

/// Whether the registry gives this session (the job's credentials) the manifest of `name`.
fn authorised(session: &Session, name: &ImageName) -> Result<()> {
    let accept = [MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST].join(", ");
    fetch_document(session, &format!("manifests/{}", name.manifest_ref()), &accept, name.digest.as_deref())
        .with_context(|| {
        format!("{} was pulled with other credentials: not served to this job", name.canonical())
    })?;
    Ok(())
}

/// Reads a JSON document of at most [`MAX_MANIFEST`] bytes and checks it against `want`.
fn fetch_document(
    session: &Session,
    path: &str,
    accept: &str,
    want: Option<&str>,
) -> Result<(Vec<u8>, String, String)> {
    let resp = session.get(path, accept, None)?;
    let content_type = resp.content_type().to_string();
    if let Some(len) = resp.header("content-length").and_then(|l| l.parse::<u64>().ok()) {
        if len > MAX_MANIFEST {
            bail!("{path} of registry {} is {len} bytes, over the cap of {MAX_MANIFEST}", session.registry);
        }
    }
    let mut body = Vec::new();
    let mut reader = resp.into_reader().take(MAX_MANIFEST + 1);
    let mut pace = Pace::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(e) = session.stopped() {
            return Err(e.into());
        }
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading {path} from registry {}", session.registry))?;
        if n == 0 {
            break;
        }
        if !pace.add(n) {
            return Err(Pace::slow(path, &session.registry).into());
        }
        body.extend_from_slice(&buf[..n]);
    }
    if body.len() as u64 > MAX_MANIFEST {
        bail!("{path} of registry {} is over the cap of {MAX_MANIFEST} bytes", session.registry);
    }
    let digest = sha256(&body);
    if let Some(w) = want {
        if w != digest {
            bail!("{path} from registry {} does not match its digest {w} (got {digest})", session.registry);
        }
    }
    Ok((body, content_type, digest))
}

fn pull_from(
    store: &ImageStore,
    session: &Session,
    name: &ImageName,
    opts: &PullOptions,
) -> Result<(ResolvedImage, String, u64)> {
    let accept = [MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST].join(", ");
    let r = name.manifest_ref().to_string();
    let (body, content_type, top_digest) =
        fetch_document(session, &format!("manifests/{r}"), &accept, name.digest.as_deref())?;
    let mut manifest: Manifest =
        serde_json::from_slice(&body).map_err(|e| not_valid(&e, "manifest", name))?;
    let mut manifest_digest = top_digest.clone();
    let kind = if manifest.media_type.is_empty() { content_type } else { manifest.media_type.clone() };
    if let Some(list) = manifest.manifests.take().filter(|_| manifest.layers.is_empty()) {
        if list.len() > MAX_LAYERS {
            bail!(
                "the index of {} lists {} manifests, over the cap of {MAX_LAYERS}",
                name.canonical(),
                list.len()
            );
        }
        let arch = host_arch();
        let pick = list
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .with_context(|| format!("{} has no linux/{arch} image in its index", name.canonical()))?;
        check_digest(&pick.digest)?;
        let (body, _, digest) =
            fetch_document(session, &format!("manifests/{}", pick.digest), &accept, Some(&pick.digest))?;
        manifest = serde_json::from_slice(&body).map_err(|e| not_valid(&e, "linux manifest", name))?;
        manifest_digest = digest;
        if manifest.manifests.is_some() && manifest.layers.is_empty() {
            bail!("{} nests an index in its index", name.canonical());
        }
    } else if manifest.schema_version == 1
        || kind.contains("manifest.v1+prettyjws")
        || kind.ends_with("manifest.v1+json") && !kind.contains("oci")
    {
        bail!("{} has a Docker schema 1 manifest, which is not supported", name.canonical());
    }
    if manifest.layers.len() > MAX_LAYERS {
        bail!(
            "the manifest of {} lists {} layers, over the cap of {MAX_LAYERS}",
            name.canonical(),
            manifest.layers.len()
        );
    }
    let config = manifest
        .config
        .as_ref()
        .with_context(|| format!("the manifest of {} has no config", name.canonical()))?;
    check_digest(&config.digest)?;
    for l in &manifest.layers {
        check_digest(&l.digest)?;
        if compression(&l.media_type).is_none() {
            bail!("layer {} of {} has an unsupported media type", l.digest, name.canonical());
        }
    }
    let declared: u64 = manifest.layers.iter().map(|l| l.size).fold(0, u64::saturating_add);
    if declared > opts.max_unpacked {
        bail!(
            "the layers of {} are {}, over the cap of {} (EXECUTOR_IMAGE_MAX_SIZE)",
            name.canonical(),
            crate::base::units::format_bytes(declared),
            crate::base::units::format_bytes(opts.max_unpacked)
        );
    }

    // Already built from this manifest: only the names are new.
    if let Ok(image) = store.point(&name_key(name), &manifest_digest, &alias(name, &top_digest)) {
        return Ok((image, top_digest, 0));
    }

    let (cfg_body, _, _) =
        fetch_document(session, &format!("blobs/{}", config.digest), "*/*", Some(&config.digest))?;
    let cfg: super::import::ImageConfigFile =
        serde_json::from_slice(&cfg_body).map_err(|e| not_valid(&e, "image config", name))?;
    let cfg = cfg.config.unwrap_or_default();

    let wanted: Vec<Wanted<'_>> =
        manifest.layers.iter().map(|l| Wanted { digest: &l.digest, size: l.size }).collect();
    // Compressed bytes count against the same cap as unpacked ones: a blob whose manifest says
    // `size: 0` stops there too.
    let budget = Budget::new(opts.max_unpacked);
    let (bytes, _blob_locks) = blob::download_layers(store, session, name, &wanted, &budget)?;

    let staging = store.staging("pull")?;
    let tree = staging.path().join("tree");
    fs::create_dir(&tree)?;
    let budget = Rc::new(Cell::new(opts.max_unpacked));
    let mut size = 0;
    for (i, l) in manifest.layers.iter().enumerate() {
        let blob = store.blob_path(&l.digest);
        let f = fs::File::open(&blob).with_context(|| format!("opening layer blob {}", blob.display()))?;
        let capped =
            Capped { inner: decompress(f, &l.media_type)?, left: budget.clone(), cap: opts.max_unpacked };
        size += super::import::apply_layer(capped, &tree).with_context(|| {
            format!(
                "applying layer {} ({}/{}) of {}",
                l.digest,
                i + 1,
                manifest.layers.len(),
                name.canonical()
            )
        })?;
    }
    let meta = ImageMeta {
        digest: manifest_digest,
        env: cfg.env.unwrap_or_default(),
        workdir: cfg.working_dir.unwrap_or_default(),
        user: cfg.user.unwrap_or_default(),
        size,
        disk: 0,
        created: super::now(),
        source: "pull".into(),
        layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
        private: false,
    };
    super::import::finish_tree(&tree)?;
    store.commit_tree_as(&tree, &meta, &name_key(name))?;
    let image = store.point(&name_key(name), &meta.digest, &alias(name, &top_digest))?;
    drop(staging);
    Ok((image, top_digest, bytes))
}

/// The store key a pull names: `registry/repo:tag`, or `registry/repo@digest` when pinned.
fn name_key(name: &ImageName) -> String {
    name.canonical()
}

/// `registry/repo@digest`, the pinned alias of a pull.
fn alias(name: &ImageName, digest: &str) -> String {
    format!("{}@{digest}", name.name())
}

/// Caps the bytes a layer stream yields, across all the layers of one image.
struct Capped {
    inner: Box<dyn Read>,
    left: Rc<Cell<u64>>,
    cap: u64,
}

impl Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let left = self.left.get();
        if n as u64 > left {
            return Err(std::io::Error::other(format!(
                "the image unpacks to more than {} (the cap, EXECUTOR_IMAGE_MAX_SIZE): refusing a decompression bomb",
                crate::base::units::format_bytes(self.cap)
            )));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// A registry's document that does not parse: where, never what it said.
fn not_valid(e: &serde_json::Error, what: &str, name: &ImageName) -> anyhow::Error {
    anyhow::anyhow!(
        "the {what} of {} is not a valid document (line {}, column {})",
        name.canonical(),
        e.line(),
        e.column()
    )
}
