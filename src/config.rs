//! The executor's settings: `EXECUTOR_*` environment variables and the equivalent flags,
//! validated into one [`Settings`] struct in one place. The shared secret only ever comes from
//! `EXECUTOR_FRONTEND_PASSWORD` or `--password-file`, and is held in a [`Secret`] that never prints.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

use crate::api::{Client, Resources};
use crate::base::secret::Secret;
use crate::base::units::{parse_duration, parse_size};
use crate::protocol::{MIN_SECRET_LEN, SOURCEGRAPH_QUEUES};
use crate::sandbox::microvm::Accel;
use crate::sandbox::RuntimeChoice;

/// Unvalidated settings as the command line and the environment give them (flags win; clap
/// fills each field from its `EXECUTOR_*` variable when the flag is absent).
#[derive(Debug, Clone, Default)]
pub struct RawSettings {
    pub frontend_url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub frontend_ca: Option<PathBuf>,
    pub queue_name: Option<String>,
    pub queue_names: Option<String>,
    pub poll_interval: Option<String>,
    pub maximum_num_jobs: Option<String>,
    pub num_total_jobs: Option<String>,
    pub max_active_time: Option<String>,
    pub maximum_runtime_per_job: Option<String>,
    pub cleanup_task_interval: Option<String>,
    pub keep_workspaces: Option<String>,
    pub job_num_cpus: Option<String>,
    pub job_memory: Option<String>,
    pub disk_space: Option<String>,
    pub runtime: Option<String>,
    pub use_firecracker: Option<String>,
    pub vm_startup_script: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub allow_unisolated: Option<String>,
    pub vm_prefix: Option<String>,
    pub oci_runtime: Option<String>,
    pub vm_accel: Option<String>,
    pub vm_allow_tcg: Option<String>,
    pub vm_pool_size: Option<String>,
    pub shutdown_grace: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub artifacts_max_size: Option<String>,
    pub git_timeout: Option<String>,
    pub workspace_templates: Option<String>,
    pub image_pull: Option<String>,
    pub docker_auth_config: Option<String>,
    pub registry_mirrors: Vec<String>,
    pub insecure_registries: Vec<String>,
    pub registry_ca: Option<PathBuf>,
    pub image_max_size: Option<String>,
    pub image_cache_size: Option<String>,
    pub network: Option<String>,
    pub network_cidr: Option<String>,
    pub network_allow: Option<String>,
    pub dns_servers: Option<String>,
    pub network_bandwidth: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Scheme and host checked; no trailing slash.
    pub frontend_url: Option<String>,
    pub password: Secret,
    /// A PEM file of extra CA certificates trusted for the coordinator.
    pub frontend_ca: Option<PathBuf>,
    /// One queue, or several with `multi_queue`.
    pub queues: Vec<String>,
    pub multi_queue: bool,
    pub poll_interval: Duration,
    pub max_jobs: usize,
    /// Stop after this many dequeues (0 = no limit).
    pub num_total_jobs: u64,
    /// Stop dequeuing after this long (`None` = no limit).
    pub max_active_time: Option<Duration>,
    pub max_runtime_per_job: Duration,
    pub cleanup_interval: Duration,
    pub keep_workspaces: bool,
    pub job_cpus: u32,
    pub job_memory: String,
    pub disk_space: String,
    /// `auto`, `shell`, `oci` or `microvm` (`EXECUTOR_RUNTIME`, else `EXECUTOR_USE_FIRECRACKER`).
    pub runtime: RuntimeChoice,
    /// A host script run inside the sandbox before the first step.
    pub vm_startup_script: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow_unisolated: bool,
    pub vm_prefix: String,
    /// The OCI runtime of the `oci` sandbox: `runc`, `crun` or `runsc`.
    pub oci_runtime: String,
    /// The microvm runtime's accelerator policy.
    pub vm_accel: Accel,
    /// Whether the microvm runtime may fall back to TCG (slow software emulation).
    pub vm_allow_tcg: bool,
    /// `EXECUTOR_VM_POOL_SIZE`: microVMs `loop` keeps booted ahead of demand; `None` chooses
    /// from memory ([`Settings::vm_pool`]).
    pub vm_pool_size: Option<usize>,
    /// How long `loop` lets running jobs finish after SIGTERM before killing them.
    pub shutdown_grace: Duration,
    /// How often `loop` heartbeats (the contract's 5 s; lower it for faster cancels).
    pub heartbeat_interval: Duration,
    /// Largest artifact archive `upload` sends.
    pub artifacts_max_bytes: u64,
    /// Limit for each git command of a clone.
    pub git_timeout: Duration,
    /// How many workspace templates (`docs/workspace.md`) to keep; 0 makes none.
    pub workspace_templates: usize,
    /// When vm-boot pulls images (`EXECUTOR_IMAGE_PULL`).
    pub image_pull: crate::image::pull::PullPolicy,
    /// How pulls reach registries.
    pub pull: crate::image::pull::PullSettings,
    /// The image store's budget (`EXECUTOR_IMAGE_CACHE_SIZE`); 0: none.
    pub image_cache_bytes: u64,
    /// Every job's network (`EXECUTOR_NETWORK`, `_CIDR`, `_ALLOW`, `EXECUTOR_DNS_SERVERS`).
    pub network: crate::network::Settings,
}

/// What a command needs besides the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The coordinator's URL and the queues (dequeue, loop, validate).
    Coordinator,
    /// Only the secret: the later stages find the URL in the run document.
    DocumentOnly,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/executor";

/// Workspace templates kept by default (`EXECUTOR_WORKSPACE_TEMPLATES`).
pub const DEFAULT_WORKSPACE_TEMPLATES: u64 = 8;

/// The disk all workspace templates together may take.
pub const WORKSPACE_TEMPLATES_MAX_BYTES: u64 = 8 << 30;

impl Settings {
    /// Validates `raw`, reading the secret from `EXECUTOR_FRONTEND_PASSWORD` or the password file.
    pub fn load(raw: RawSettings, needs: Needs) -> Result<Settings> {
        let password = load_password(raw.password_file.as_deref())?;
        Self::from_raw(raw, password, needs)
    }

    /// Validates `raw` with the secret already read.
    pub fn from_raw(raw: RawSettings, password: Secret, needs: Needs) -> Result<Settings> {
        if password.expose().chars().count() < MIN_SECRET_LEN {
            bail!("the frontend password is shorter than {MIN_SECRET_LEN} characters");
        }
        let frontend_url = match raw.frontend_url.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(u) => Some(validate_url(u)?),
            None if needs == Needs::Coordinator => bail!("EXECUTOR_FRONTEND_URL (--frontend-url) is not set"),
            None => None,
        };
        let (queues, multi_queue) =
            parse_queues(raw.queue_name.as_deref(), raw.queue_names.as_deref(), needs)?;
        let max_jobs = parse_num("EXECUTOR_MAXIMUM_NUM_JOBS", raw.maximum_num_jobs.as_deref(), 1)?;
        if max_jobs == 0 {
            bail!("EXECUTOR_MAXIMUM_NUM_JOBS must be at least 1");
        }
        let max_runtime = parse_duration_var(
            "EXECUTOR_MAXIMUM_RUNTIME_PER_JOB",
            raw.maximum_runtime_per_job.as_deref(),
            "30m",
        )?;
        if max_runtime.is_zero() {
            bail!("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB must be more than 0");
        }
        let max_active = parse_duration_var("EXECUTOR_MAX_ACTIVE_TIME", raw.max_active_time.as_deref(), "0")?;
        let job_memory = raw.job_memory.unwrap_or_else(|| "12G".into());
        parse_size(&job_memory).with_context(|| format!("EXECUTOR_JOB_MEMORY {job_memory:?}"))?;
        let disk_space = raw.disk_space.unwrap_or_else(|| "20G".into());
        parse_size(&disk_space).with_context(|| format!("EXECUTOR_FIRECRACKER_DISK_SPACE {disk_space:?}"))?;
        let artifacts = raw.artifacts_max_size.unwrap_or_else(|| "100M".into());
        let artifacts_max_bytes =
            parse_size(&artifacts).with_context(|| format!("EXECUTOR_ARTIFACTS_MAX_SIZE {artifacts:?}"))?;
        let firecracker = parse_opt_bool("EXECUTOR_USE_FIRECRACKER", raw.use_firecracker.as_deref())?;
        let implied = match firecracker {
            Some(true) => "microvm",
            Some(false) => "oci",
            None => "auto",
        };
        let runtime: RuntimeChoice = raw
            .runtime
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(implied)
            .to_ascii_lowercase()
            .parse()
            .map_err(|e: anyhow::Error| anyhow::anyhow!("EXECUTOR_RUNTIME {e}"))?;
        let vm_prefix = raw.vm_prefix.unwrap_or_else(|| "executor".into());
        if vm_prefix.is_empty()
            || !vm_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("EXECUTOR_VM_PREFIX {vm_prefix:?} must be letters, digits, '-' or '_'");
        }
        let oci_runtime = raw
            .oci_runtime
            .unwrap_or_else(|| crate::sandbox::oci::DEFAULT_OCI_RUNTIME.into())
            .trim()
            .to_ascii_lowercase();
        if !crate::sandbox::oci::OCI_RUNTIMES.contains(&oci_runtime.as_str()) {
            bail!("EXECUTOR_OCI_RUNTIME {oci_runtime:?} is not one of runc, crun, runsc");
        }
        let vm_startup_script = match raw.vm_startup_script.filter(|p| !p.as_os_str().is_empty()) {
            Some(p) if !p.is_file() => {
                bail!("EXECUTOR_VM_STARTUP_SCRIPT_PATH {} is not a file", p.display())
            }
            other => other,
        };
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            bail!("EXECUTOR_STATE_DIR {} must be an absolute path", state_dir.display());
        }
        Ok(Settings {
            frontend_url,
            password,
            frontend_ca: raw.frontend_ca.filter(|p| !p.as_os_str().is_empty()),
            queues,
            multi_queue,
            poll_interval: parse_duration_var(
                "EXECUTOR_QUEUE_POLL_INTERVAL",
                raw.poll_interval.as_deref(),
                "1s",
            )?,
            max_jobs: max_jobs as usize,
            num_total_jobs: parse_num("EXECUTOR_NUM_TOTAL_JOBS", raw.num_total_jobs.as_deref(), 0)?,
            max_active_time: if max_active.is_zero() { None } else { Some(max_active) },
            max_runtime_per_job: max_runtime,
            cleanup_interval: parse_duration_var(
                "EXECUTOR_CLEANUP_TASK_INTERVAL",
                raw.cleanup_task_interval.as_deref(),
                "1m",
            )?,
            keep_workspaces: parse_bool("EXECUTOR_KEEP_WORKSPACES", raw.keep_workspaces.as_deref())?,
            job_cpus: parse_num("EXECUTOR_JOB_NUM_CPUS", raw.job_num_cpus.as_deref(), 4)? as u32,
            job_memory,
            disk_space,
            runtime,
            vm_startup_script,
            state_dir,
            allow_unisolated: parse_bool("EXECUTOR_ALLOW_UNISOLATED", raw.allow_unisolated.as_deref())?,
            vm_prefix,
            oci_runtime,
            vm_accel: raw
                .vm_accel
                .as_deref()
                .unwrap_or("auto")
                .trim()
                .parse()
                .map_err(|e: anyhow::Error| anyhow::anyhow!("EXECUTOR_VM_ACCEL: {e}"))?,
            vm_allow_tcg: parse_bool("EXECUTOR_VM_ALLOW_TCG", raw.vm_allow_tcg.as_deref())?,
            vm_pool_size: match raw.vm_pool_size.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                None | Some("auto") => None,
                Some(v) => Some(parse_num("EXECUTOR_VM_POOL_SIZE", Some(v), 0)? as usize),
            },
            shutdown_grace: parse_duration_var(
                "EXECUTOR_SHUTDOWN_GRACE",
                raw.shutdown_grace.as_deref(),
                "30s",
            )?,
            heartbeat_interval: parse_duration_var(
                "EXECUTOR_HEARTBEAT_INTERVAL",
                raw.heartbeat_interval.as_deref(),
                "5s",
            )?
            .max(Duration::from_millis(100)),
            artifacts_max_bytes,
            git_timeout: parse_duration_var("EXECUTOR_GIT_TIMEOUT", raw.git_timeout.as_deref(), "10m")?,
            workspace_templates: parse_num(
                "EXECUTOR_WORKSPACE_TEMPLATES",
                raw.workspace_templates.as_deref(),
                DEFAULT_WORKSPACE_TEMPLATES,
            )? as usize,
            image_pull: crate::image::pull::PullPolicy::parse(raw.image_pull.as_deref().unwrap_or(""))?,
            pull: crate::image::pull::PullSettings::new(
                raw.docker_auth_config.as_deref(),
                &raw.registry_mirrors,
                &raw.insecure_registries,
                raw.registry_ca.as_deref(),
                raw.image_max_size.as_deref(),
            )?,
            image_cache_bytes: parse_cache_size(raw.image_cache_size.as_deref())?,
            network: crate::network::Settings::parse(
                raw.network.as_deref(),
                raw.network_cidr.as_deref(),
                raw.network_allow.as_deref(),
                raw.dns_servers.as_deref(),
            )?
            .with_bandwidth(raw.network_bandwidth.as_deref())?,
        })
    }

    /// The coordinator's URL, for commands that need it.
    pub fn frontend_url(&self) -> Result<&str> {
        self.frontend_url.as_deref().context("EXECUTOR_FRONTEND_URL (--frontend-url) is not set")
    }

    /// A coordinator client for `base_url` with this executor's CA and shared secret.
    pub fn client(&self, base_url: &str, executor_name: &str) -> Result<Client> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let sources = crate::api::metrics::Sources {
            node_exporter: var("NODE_EXPORTER_URL"),
            registry_exporter: var("DOCKER_REGISTRY_NODE_EXPORTER_URL"),
        };
        Ok(Client::new(self.frontend_ca.as_deref(), &self.password, base_url, executor_name)?
            .with_metrics_sources(sources))
    }

    /// What a job may use here, as each dequeue reports it.
    pub fn resources(&self) -> Resources {
        Resources {
            num_cpus: self.job_cpus as i64,
            memory: self.job_memory.clone(),
            disk_space: self.disk_space.clone(),
        }
    }

    /// The options every sandbox runtime gets.
    pub fn runtime_options(&self) -> crate::sandbox::RuntimeOptions {
        crate::sandbox::RuntimeOptions {
            state_dir: self.state_dir.clone(),
            allow_unisolated: self.allow_unisolated,
            oci_runtime: self.oci_runtime.clone(),
            vm_accel: self.vm_accel,
            vm_allow_tcg: self.vm_allow_tcg,
            network: self.network.clone(),
        }
    }

    /// Resource limits for one job's sandbox.
    pub fn limits(&self) -> crate::sandbox::Limits {
        crate::sandbox::Limits {
            cpus: self.job_cpus,
            memory_bytes: parse_size(&self.job_memory).unwrap_or(0),
            disk_bytes: parse_size(&self.disk_space).unwrap_or(0),
            pids: 0,
        }
    }

    /// The microVM pool of `loop` when it runs `runtime`: its size and the memory budget. 0 for
    /// any other runtime; else `EXECUTOR_VM_POOL_SIZE`, or when unset (or `auto`) as many idle
    /// VMs as fit in the budget beside `EXECUTOR_MAXIMUM_NUM_JOBS` jobs at their full size, at
    /// most that many (`Budget::default_pool_size`).
    pub fn vm_pool(
        &self,
        runtime: crate::sandbox::RuntimeKind,
    ) -> Result<(usize, crate::sandbox::microvm::pool::Budget)> {
        let budget = crate::sandbox::microvm::pool::Budget::for_host(&self.limits())?;
        let size = if runtime != crate::sandbox::RuntimeKind::Microvm {
            0
        } else {
            self.vm_pool_size.unwrap_or_else(|| budget.default_pool_size(self.max_jobs))
        };
        Ok((size, budget))
    }

    /// Where job workspaces live.
    pub fn workspaces_dir(&self) -> PathBuf {
        self.state_dir.join("workspaces")
    }

    /// The workspace templates of this state directory, within their bounds.
    pub fn templates(&self) -> crate::workspace::template::Templates {
        crate::workspace::template::Templates::new(
            crate::workspace::templates_dir(&self.workspaces_dir()),
            self.workspace_templates,
            WORKSPACE_TEMPLATES_MAX_BYTES,
        )
    }
}

/// Reads the secret from `--password-file` or `EXECUTOR_FRONTEND_PASSWORD`.
pub fn load_password(file: Option<&std::path::Path>) -> Result<Secret> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the password file {}", path.display()))?;
        let pw = text.trim_end_matches(['\n', '\r']);
        if pw.is_empty() {
            bail!("the password file {} is empty", path.display());
        }
        return Ok(Secret::new(pw));
    }
    match std::env::var("EXECUTOR_FRONTEND_PASSWORD") {
        Ok(pw) if !pw.is_empty() => Ok(Secret::new(pw)),
        _ => bail!("no shared secret: set EXECUTOR_FRONTEND_PASSWORD or pass --password-file"),
    }
}

fn validate_url(u: &str) -> Result<String> {
    let (scheme, rest) = u.split_once("://").with_context(|| format!("frontend URL {u:?} has no scheme"))?;
    if scheme != "http" && scheme != "https" {
        bail!("frontend URL {u:?}: scheme must be http or https");
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        bail!("frontend URL {u:?} has no host (or carries credentials)");
    }
    if rest.contains(['?', '#']) {
        bail!("frontend URL {u:?} must not have a query or fragment");
    }
    Ok(u.trim_end_matches('/').to_string())
}

fn parse_queues(name: Option<&str>, names: Option<&str>, needs: Needs) -> Result<(Vec<String>, bool)> {
    let name = name.map(str::trim).filter(|s| !s.is_empty());
    let names = names.map(str::trim).filter(|s| !s.is_empty());
    let check = |q: &str| -> Result<()> {
        if !SOURCEGRAPH_QUEUES.contains(&q) {
            bail!("queue {q:?} is not one of {}", SOURCEGRAPH_QUEUES.join(", "));
        }
        Ok(())
    };
    match (name, names) {
        (Some(_), Some(_)) => bail!("set only one of EXECUTOR_QUEUE_NAME and EXECUTOR_QUEUE_NAMES"),
        (Some(q), None) => {
            check(q)?;
            Ok((vec![q.to_string()], false))
        }
        (None, Some(list)) => {
            let mut qs: Vec<String> = Vec::new();
            for q in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                check(q)?;
                if !qs.iter().any(|x| x == q) {
                    qs.push(q.to_string());
                }
            }
            if qs.is_empty() {
                bail!("EXECUTOR_QUEUE_NAMES names no queue");
            }
            Ok((qs, true))
        }
        (None, None) if needs == Needs::Coordinator => {
            bail!("set EXECUTOR_QUEUE_NAME (--queue) or EXECUTOR_QUEUE_NAMES (--queues)")
        }
        (None, None) => Ok((Vec::new(), false)),
    }
}

/// `EXECUTOR_IMAGE_CACHE_SIZE`: a size (`20G`), or unset, empty or `0` for no budget.
pub fn parse_cache_size(v: Option<&str>) -> Result<u64> {
    match v.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(0),
        Some(v) => crate::base::units::parse_size(v).with_context(|| {
            format!("EXECUTOR_IMAGE_CACHE_SIZE {v:?} is not a size (like 20G, or 0 for no budget)")
        }),
    }
}

fn parse_num(var: &str, v: Option<&str>, default: u64) -> Result<u64> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s.parse().with_context(|| format!("{var} {s:?} is not a whole number")),
    }
}

/// A boolean that may be absent (`None`), unlike [`parse_bool`]'s false default.
fn parse_opt_bool(var: &str, v: Option<&str>) -> Result<Option<bool>> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => parse_bool(var, Some(s)).map(Some),
    }
}

fn parse_bool(var: &str, v: Option<&str>) -> Result<bool> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some(other) => bail!("{var} {other:?} is not a boolean (true or false)"),
    }
}

fn parse_duration_var(var: &str, v: Option<&str>, default: &str) -> Result<Duration> {
    let s = v.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(default);
    parse_duration(s).with_context(|| format!("{var} {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw() -> Secret {
        Secret::new("s".repeat(24))
    }

    fn raw() -> RawSettings {
        RawSettings {
            frontend_url: Some("http://127.0.0.1:3080/".into()),
            queue_name: Some("batches".into()),
            ..Default::default()
        }
    }

    #[test]
    fn use_firecracker_picks_the_runtime_unless_one_is_named() {
        for (fc, rt, want) in [
            (Some("true"), None, RuntimeChoice::Only(crate::sandbox::RuntimeKind::Microvm)),
            (Some("false"), None, RuntimeChoice::Only(crate::sandbox::RuntimeKind::Oci)),
            (None, None, RuntimeChoice::Auto),
            (Some("true"), Some("oci"), RuntimeChoice::Only(crate::sandbox::RuntimeKind::Oci)),
        ] {
            let mut r = raw();
            r.use_firecracker = fc.map(Into::into);
            r.runtime = rt.map(Into::into);
            assert_eq!(
                Settings::from_raw(r, pw(), Needs::Coordinator).unwrap().runtime,
                want,
                "{fc:?} {rt:?}"
            );
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_raw(raw(), pw(), Needs::Coordinator).unwrap();
        assert_eq!(s.frontend_url.as_deref(), Some("http://127.0.0.1:3080"));
        assert_eq!(s.queues, vec!["batches"]);
        assert!(!s.multi_queue);
        assert_eq!(s.poll_interval, Duration::from_secs(1));
        assert_eq!(s.max_jobs, 1);
        assert_eq!(s.max_runtime_per_job, Duration::from_secs(1800));
        assert_eq!(s.max_active_time, None);
        assert_eq!(s.job_cpus, 4);
        assert_eq!(s.limits().memory_bytes, 12 << 30);
        assert_eq!(s.runtime, RuntimeChoice::Auto);
        assert_eq!(s.oci_runtime, "runc");
        assert!(!s.allow_unisolated);
        assert_eq!(s.network.mode, crate::network::Mode::Internet, "jobs reach the internet by default");
    }

    #[test]
    fn password_never_prints() {
        let s = Settings::from_raw(raw(), pw(), Needs::Coordinator).unwrap();
        let shown = format!("{s:?} {}", s.password);
        assert!(!shown.contains(&"s".repeat(24)), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn rejects_bad_values_with_their_names() {
        let short = Settings::from_raw(raw(), Secret::new("short"), Needs::Coordinator).unwrap_err();
        assert!(short.to_string().contains("shorter than 20"), "{short}");
        let mut r = raw();
        r.queue_names = Some("codeintel".into());
        let both = Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err();
        assert!(both.to_string().contains("only one"), "{both}");
        let mut r = raw();
        r.queue_name = Some("nope".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator)
            .unwrap_err()
            .to_string()
            .contains("\"nope\""));
        let mut r = raw();
        r.frontend_url = Some("ftp://x".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator).is_err());
        let mut r = raw();
        r.maximum_runtime_per_job = Some("10x".into());
        let e = format!("{:#}", Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err());
        assert!(e.contains("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB"), "{e}");
        // The one duration syntax of the project: a bare number is seconds, as for the coordinator.
        let mut r = raw();
        r.poll_interval = Some("5".into());
        r.maximum_runtime_per_job = Some("1h30m".into());
        let s = Settings::from_raw(r, pw(), Needs::Coordinator).unwrap();
        assert_eq!(
            (s.poll_interval, s.max_runtime_per_job),
            (Duration::from_secs(5), Duration::from_secs(5400))
        );
        let mut r = raw();
        r.runtime = Some("docker".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator).is_err());
        let mut r = raw();
        r.use_firecracker = Some("maybe".into());
        let e = format!("{:#}", Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err());
        assert!(e.contains("EXECUTOR_USE_FIRECRACKER"), "{e}");
        let mut r = raw();
        r.vm_startup_script = Some("/nonexistent/startup.sh".into());
        let e = format!("{:#}", Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err());
        assert!(e.contains("EXECUTOR_VM_STARTUP_SCRIPT_PATH"), "{e}");
        let mut r = raw();
        r.frontend_url = None;
        assert!(Settings::from_raw(r.clone(), pw(), Needs::Coordinator).is_err());
        r.queue_name = None;
        assert!(Settings::from_raw(r, pw(), Needs::DocumentOnly).is_ok());
    }

    #[test]
    fn multi_queue() {
        let mut r = raw();
        r.queue_name = None;
        r.queue_names = Some("codeintel, batches,codeintel".into());
        let s = Settings::from_raw(r, pw(), Needs::Coordinator).unwrap();
        assert_eq!(s.queues, vec!["codeintel", "batches"]);
        assert!(s.multi_queue);
    }
}
